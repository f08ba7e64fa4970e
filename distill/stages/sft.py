"""Stage `sft`: curated samples -> the SFT set, as chat messages plus provenance columns.

Reads `RUN/decontam/`, writes `RUN/sft/`: one row per kept sample with `messages` (the
conversation the trainer tokenises with the student's chat template) and where it came from
(question id, source, sample index, teacher, pass rate, completion tokens, generation key).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from distill.config import RunConfig
from distill.stages import ActorAsk, Stage
from distill.stages.derived import finish_stage, open_partitioned, run_units

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SFT_SCHEMA = pa.schema([
    ("key", pa.string()), ("messages", pa.list_(MESSAGE)), ("id", pa.string()), ("source", pa.string()),
    ("sample_idx", pa.int32()), ("teacher", pa.string()), ("answer", pa.string()), ("pred_answer", pa.string()),
    ("pass_rate", pa.float64()), ("n_tokens", pa.int32()),
])
PROVENANCE = [n for n in SFT_SCHEMA.names if n != "messages"]


def resources(cfg: RunConfig) -> ActorAsk:
    return ActorAsk(cfg.curate.workers, 1)


def _setup(sft_cfg):
    return sft_cfg


def _process(sft_cfg, records):
    from distill.curate.sft import to_messages

    rows, empty = [], []
    for r in records:
        messages = to_messages(r, sft_cfg)
        if not messages[-1]["content"].strip():
            empty.append({**r, "reason": "empty_assistant: nothing to train on in this format"})
            continue
        rows.append({"messages": messages, **{k: r.get(k) for k in PROVENANCE}})
    return rows, empty


def run(cfg: RunConfig, run_dir: Path):
    sc = STAGE.config(cfg)
    store, units = open_partitioned(run_dir, STAGE, cfg)
    _, seconds = run_units(store, units, cfg, "sft", setup=_setup, setup_args=(sc,), process=_process,
                            ask=resources(cfg))
    manifest = finish_stage(store, "sft", seconds)
    print(f"sft: {manifest.counts['records']} training conversations in {store.root}", flush=True)
    return manifest


STAGE = Stage("sft", "curate.sft", run, resources, reads="decontam", schema=SFT_SCHEMA)
