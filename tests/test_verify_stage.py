"""The verify stage on Ray writes every column it declares: `label` and `agreement` included.

Real GSM8K-train questions, teacher samples written by hand (as in test_curate_stages), one
question without a reference; `distill curate` runs the verify stage alone.
"""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import DATA, REPO, distill_cmd
from test_curate_stages import _write_run

pytestmark = pytest.mark.slow


def test_verify_stage_writes_label_and_agreement(tmp_path):
    from distill.stages.verify import VERIFY_COLUMNS

    train = [json.loads(line) for line in open(DATA / "train" / "gsm8k_train.jsonl").readlines()[:3]]
    questions = [{k: q[k] for k in ("id", "problem", "answer")} for q in train]
    questions[2]["answer"] = None  # no reference: majority vote
    a0, a1, a2 = (q["answer"] for q in train)
    wrong = str(int(a1) + 1)
    samples = {
        train[0]["id"]: [("ok", a0), ("ok", a0)],
        train[1]["id"]: [("ok", a1), ("ok", wrong), ("truncated", "")],
        train[2]["id"]: [("ok", a2), ("ok", a2), ("ok", wrong)],
    }
    run = _write_run(tmp_path, questions, samples)
    cfg = {"run": {"dir": str(run), "stages": ["verify"], "progress": False}, "ray": {"num_cpus": 2},
           "curate": {"shard_size": 2, "verify": {"timeout_s": 3, "workers": 1}}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(distill_cmd("curate", str(cfg_path)), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr

    rows = [r for p in sorted((run / "verify").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 8
    for name, _ in VERIFY_COLUMNS:
        assert any(r[name] is not None for r in rows), name
    by_q = {}
    for r in rows:
        by_q.setdefault(r["id"], set()).add((r["label"], r["agreement"]))
    # One (label, agreement) per question. With a reference: the reference and the share of the
    # extracted answers equal to it (the truncated sample has none); without: the majority.
    assert by_q[train[0]["id"]] == {(a0, 1.0)}
    assert by_q[train[1]["id"]] == {(a1, 0.5)}
    ((label, agreement),) = by_q[train[2]["id"]]
    assert label == a2 and agreement == pytest.approx(2 / 3)
