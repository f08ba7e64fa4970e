"""No stage declares a column it never writes: the real stages (generate through a loopback
OpenAI-compatible server, then verify, filter, dedup, decontam, sft) run through `distill run` on
a small set that exercises every path that fills a column (questions with and without a
reference, right and wrong answers, a truncated sample, a prompt the server refuses, a duplicate
question, a copy of a benchmark item). Then, for every stage, every column of its accepted and
rejected shards must hold at least one non-null value, bar a short allowlist, each entry with its
reason. (Verify once declared `label` and `agreement` and never wrote them.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DATA, distill_cmd
from distill.config import PromptConfig
from distill.generation import build_messages
from distill.teachers.base import derive_seed
from distill.testing.fault_server import FaultServer, completion_text

pytestmark = pytest.mark.slow

PROMPT = PromptConfig(template="Q: {problem}")
SEED = 7
MAX_NEW_TOKENS = 120
STAGES = ["generate", "verify", "filter", "dedup", "decontam", "sft"]
CHECKED = ["source", *STAGES]  # source/: the ingested questions and the quarantined rows

# (stage, part, column) -> why it is null on every row of this run. Keep it short: every entry is
# a column that this run cannot fill, never one that a stage forgets to.
ALLOWED_ALL_NULL = {
    # verify adds columns and rejects nothing by design (the filter stage rejects on its verdicts):
    # its rejected store is declared but never has a shard.
    ("verify", "rejected", "<no shards>"): "verify rejects nothing",
    # sft rejects only samples whose assistant turn comes out empty; every sample the filter keeps
    # here has a boxed answer after its </think>, so there is nothing to reject.
    ("sft", "rejected", "<no shards>"): "no empty assistant turn survives the filter",
}


def server_answer(qid: str, problem: str, sample_idx: int) -> str:
    """The number the loopback server will box for this question's sample (it is a pure function
    of prompt and seed), so a reference can be made right for sample 0 and wrong for sample 1."""
    prompt = build_messages(problem, PROMPT)[-1]["content"]
    text = completion_text(prompt, derive_seed(SEED, qid, sample_idx))
    return text.rsplit("\\boxed{", 1)[1].split("}", 1)[0]


def _questions() -> list[dict]:
    with open(DATA / "train" / "gsm8k_train.jsonl") as f:
        train = [json.loads(next(f)) for _ in range(6)]
    bench = json.loads((DATA / "benchmarks" / "gsm8k.jsonl").open().readline())
    qs = [{"id": f"ref{i}", "problem": q["problem"]} for i, q in enumerate(train[:4])]
    qs += [{"id": f"noref{i}", "problem": q["problem"], "answer": None} for i, q in enumerate(train[4:6])]
    qs.append({"id": "dup", "problem": train[0]["problem"].upper()})       # dedup rejects it
    qs.append({"id": "contam", "problem": bench["problem"]})             # decontam rejects it
    qs.append({"id": "refused", "problem": "TOO_LONG " + train[1]["problem"]})  # the server answers 400
    qs.append({"id": "long", "problem": " ".join(["word"] * (MAX_NEW_TOKENS + 10))})  # truncated
    for q in qs:
        if "answer" not in q:  # right for sample 0, so every stage downstream of the filter has rows
            q["answer"] = server_answer(q["id"], q["problem"], 0)
    return qs + [{"id": "empty", "problem": "  ", "answer": "1"}]  # quarantined by the source reader


def _columns_all_null(root: Path) -> dict[str, list[str]]:
    """{"accepted" | "rejected": columns with no non-null value} of a stage directory's shards;
    an empty part (no rows) is reported as such, since it cannot show anything."""
    out = {}
    for part, pattern in (("accepted", "part-*.parquet"), ("rejected", "rejected/part-*.parquet")):
        files = sorted(root.glob(pattern))
        if not files:
            out[part] = ["<no shards>"]
            continue
        tables = [pq.read_table(f) for f in files]
        rows = sum(t.num_rows for t in tables)
        if rows == 0:
            out[part] = ["<no rows>"]
            continue
        names = tables[0].schema.names
        out[part] = [n for n in names if sum(t.column(n).null_count for t in tables) == rows]
    return out


def test_every_declared_column_is_filled(tmp_path):
    questions = _questions()
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(q) + "\n" for q in questions))
    with FaultServer() as server:
        cfg = {
            "run": {"dir": str(tmp_path / "run"), "progress": False, "stages": STAGES},
            "ray": {"num_cpus": 2},
            "source": {"path": str(seeds), "max_bad_fraction": 0.2},
            "generate": {
                "engine": "openai", "n_samples": 2, "shard_size": 8, "replicas": 1, "cpus_per_replica": 0.5,
                "prompt": {"template": PROMPT.template},
                "sampling": {"max_new_tokens": MAX_NEW_TOKENS, "seed": SEED},
                "openai": {"base_url": server.base_url, "model": "teacher", "concurrency": 4, "max_retries": 2},
            },
            "curate": {"shard_size": 4, "workers": 1, "verify": {"workers": 1},
                       "decontam": {"benchmarks": [{"name": "gsm8k", "path": str(DATA / "benchmarks" / "gsm8k.jsonl")}]}},
        }
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.run(distill_cmd("run", str(tmp_path / "cfg.yaml")), capture_output=True, text=True,
                              timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    found = {}
    for stage in CHECKED:
        for part, cols in _columns_all_null(tmp_path / "run" / stage).items():
            for col in cols:
                found[(stage, part, col)] = True
    unexpected = sorted(k for k in found if k not in ALLOWED_ALL_NULL)
    assert not unexpected, f"declared columns never written in this run: {unexpected}"
    stale = sorted(k for k in ALLOWED_ALL_NULL if k not in found)
    assert not stale, f"allowlisted columns that are filled now (drop them from the allowlist): {stale}"
