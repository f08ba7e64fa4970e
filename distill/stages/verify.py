"""Stage `verify`: teacher samples -> the same samples with their final answer and a verdict.

Reads `RUN/generate/` (`RUN/import/` when the run imports traces), writes `RUN/verify/`.
Rejects nothing (the `wrong_answer` and
`truncated` filters do, in the next stage); adds `pred_answer`, `verdict`, `verdict_detail`,
`correct`, `pass_rate`, `n_samples`, `label` (the reference, or the majority pseudo-label) and
`agreement` (the share of the question's extracted answers that agree with the label; see
`distill.curate.verify.verify_records`). Symbolic checks run in worker processes owned by each
Ray actor, under a hard time limit, so model output is never parsed by sympy in the driver.
With `curate.verify.judge.enabled`, each actor also builds the teacher engine (`generate.engine`)
and asks it about the pairs the symbolic path cannot decide.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from distill.config import RunConfig
from distill.stages import ActorAsk, Stage, samples_stage
from distill.stages.derived import finish_stage, open_partitioned, run_units

VERIFY_COLUMNS = [("pred_answer", pa.string()), ("label", pa.string()), ("agreement", pa.float64()),
                  ("verdict", pa.string()), ("verdict_detail", pa.string()), ("correct", pa.bool_()),
                  ("pass_rate", pa.float64()), ("n_samples", pa.int32())]


def resources(cfg: RunConfig) -> ActorAsk:
    cur = cfg.curate
    return ActorAsk(cur.workers, cur.verify.workers,
                    what=f"{cur.verify.workers} verifier processes per actor; first, the exchange of {samples_stage(cfg)}'s "
                         f"shards into partitions on {cur.workers} 1-CPU actors")


def _setup(verify_cfg, gen):
    from distill.curate.verify import Verifier, engine_judge

    judge = None
    if verify_cfg.judge.enabled:
        from distill.teachers import build_engine

        judge = engine_judge(build_engine(gen.engine, gen.engine_config()), verify_cfg.judge)
    return verify_cfg, Verifier(verify_cfg), judge


def _process(state, records):
    from distill.curate.verify import verify_records

    verify_cfg, verifier, judge = state
    stats: Counter[str] = Counter()
    out = verify_records(records, verifier, verify_cfg, judge=judge, stats=stats)
    return out, [], Counter(r["verdict"] for r in out) + stats


def run(cfg: RunConfig, run_dir: Path):
    vc = STAGE.config(cfg)
    store, units = open_partitioned(run_dir, STAGE, cfg)
    print(f"verify: {len(units)} of {store.manifest.partitions} partitions to verify", flush=True)
    # Each actor runs `vc.workers` verifier processes: `resources` reserves that many CPUs for it.
    verdicts, seconds = run_units(store, units, cfg, "verify", setup=_setup, setup_args=(vc, cfg.generate),
                                  process=_process, ask=resources(cfg))
    # `_process` counts verdicts and, with the judge on, its outcomes (`judged_*`, `judge_skipped`).
    judged = {k: v for k, v in verdicts.items() if k.startswith("judge")}
    summary = {"verdicts_this_run": {k: v for k, v in verdicts.items() if k not in judged}}
    if vc.judge.enabled:
        summary["judge_this_run"] = judged
    return finish_stage(store, "verify", seconds, summary)


STAGE = Stage("verify", "curate.verify", run, resources, reads="generate", adds=tuple(VERIFY_COLUMNS),
              reads_from=samples_stage)
