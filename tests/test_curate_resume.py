"""Curation under a `kill -9` of the driver's whole process group, and on unreadable input.

The run's generate/ is written by hand from real GSM8K-train questions (three samples each, in
generate's arrival-order shards), so verify must exchange it into partitions. One `distill
curate` is killed with SIGKILL to its process group (the driver and the embedded Ray it started)
once verify has committed some partitions but not all; the rerun must finish, and every stage's
output must equal that of an uninterrupted run: each sample exactly once, the same decisions.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DATA, REPO, distill_cmd, kill_group_when

pytestmark = pytest.mark.slow

STAGES = ["verify", "filter", "dedup", "decontam", "sft"]
N_QUESTIONS, N_SAMPLES = 150, 3


def _write_run(root: Path) -> list[str]:
    from distill.config import SourceConfig
    from distill.generation import GEN_REJECTED_SCHEMA, GENERATED_SCHEMA
    from distill.sources import ingest
    from distill.store import ShardStore

    with open(DATA / "train" / "gsm8k_train.jsonl") as f:
        qs = [json.loads(next(f)) for _ in range(N_QUESTIONS)]
    qs.append({"id": "dup", "problem": qs[0]["problem"].upper(), "answer": qs[0]["answer"]})
    seeds = root.parent / f"{root.name}-seeds.jsonl"
    seeds.write_text("".join(json.dumps({k: q[k] for k in ("id", "problem", "answer")}) + "\n" for q in qs))
    ingest(SourceConfig(path=str(seeds)), root / "source")
    store = ShardStore(root / "generate", stage="generate", fingerprint="test", settings={},
                       schema=GENERATED_SCHEMA, rejected_schema=GEN_REJECTED_SCHEMA).open()
    records = []
    for s in range(N_SAMPLES):  # sample-major, as a pool of replicas commits them: questions span shards
        for i, q in enumerate(qs):
            answer = q["answer"] if (i + s) % 4 else str(int(q["answer"]) + 1)
            text = f"<think>\nStep by step for question {q['id']}.\n</think>\n\nSo the answer is $\\boxed{{{answer}}}$."
            records.append({
                "key": f"{q['id']}#{s}#h", "id": q["id"], "problem": q["problem"], "answer": q["answer"],
                "source": "test", "sample_idx": s, "seed": s, "teacher": "hand", "params_hash": "h",
                "completion": text, "reasoning": text.split("</think>")[0][8:], "response": text.split("</think>")[1],
                "finish_reason": "stop", "prompt_tokens": 50, "n_tokens": len(text.split()),
            })
    for k, lo in enumerate(range(0, len(records), 40)):
        store.commit(k, records[lo:lo + 40])
    store.finish({})
    return [r["key"] for r in records]


def _config(tmp_path: Path, run: Path) -> Path:
    cfg = {
        "run": {"dir": str(run), "stages": STAGES, "progress": False},
        "ray": {"num_cpus": 2},
        "curate": {
            "shard_size": 8, "workers": 1,
            "verify": {"timeout_s": 3, "workers": 1},
            "decontam": {"benchmarks": [{"name": "gsm8k", "path": str(DATA / "benchmarks" / "gsm8k.jsonl")}]},
        },
    }
    path = tmp_path / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(stage_dir: Path, rejected: bool = False) -> list[dict]:
    root = stage_dir / "rejected" if rejected else stage_dir
    return [r for p in sorted(root.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def _canonical(run: Path, stage: str) -> list[str]:
    rows = _rows(run / stage) + _rows(run / stage, rejected=True)
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)


def test_driver_group_killed_mid_verify_then_resumed(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    keys = _write_run(run)
    _write_run(ref)
    cfg, ref_cfg = _config(tmp_path, run), _config(tmp_path, ref)

    full = subprocess.run(distill_cmd("curate", str(ref_cfg)), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stdout + full.stderr[-3000:]
    n_parts = json.loads((ref / "verify" / "_manifest.json").read_text())["partitions"]
    assert n_parts == -(-len(keys) // 8)
    # What `--dry-run` prints for each stage is what the stage asked Ray for (and, with one
    # worker of one CPU on a 2-CPU cluster, what it placed).
    from distill.config import load_config
    from distill.plan import stage_resources

    for plan in stage_resources(load_config(ref_cfg, require_source=False), STAGES):
        actors = json.loads((ref / plan.name / "_manifest.json").read_text())["summary"]["actors"]
        asked = {"replicas": plan.actors, "cpus": plan.cpus, "gpus": plan.gpus}
        assert actors["asked"] == asked == actors["placed"], (plan.name, actors)

    kill_group_when(distill_cmd("curate", str(cfg)), lambda: len(list((run / "verify").glob("part-*.parquet"))) >= 3,
                    "verify", timeout_s=600)
    committed = len(list((run / "verify").glob("part-*.parquet")))
    assert 3 <= committed < n_parts, "the kill must land mid-stage"
    assert json.loads((run / "verify" / "_manifest.json").read_text())["status"] == "running"

    again = subprocess.run(distill_cmd("curate", str(cfg)), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert f"verify: {n_parts - committed} of {n_parts} partitions to verify" in again.stdout, again.stdout

    verified = _rows(run / "verify") + _rows(run / "verify", rejected=True)
    counts = Counter(r["key"] for r in verified)
    assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}
    for stage in STAGES:
        assert _canonical(run, stage) == _canonical(ref, stage), f"{stage} differs from the uninterrupted run"
        assert json.loads((run / stage / "_manifest.json").read_text())["status"] == "complete"
        assert not (run / stage / ".exchange").exists() and not (run / stage / ".tmp").exists()
    # The duplicate question was dropped whole, as a copy of the first.
    assert {r["id"] for r in _rows(run / "dedup", rejected=True)} == {"dup"}


def test_unreadable_input_shard_fails_the_stage_naming_it(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    cfg = _config(tmp_path, run)
    bad = run / "generate" / "part-00002.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated: no footer

    out = subprocess.run(distill_cmd("curate", str(cfg)), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode != 0
    assert str(bad) in out.stdout + out.stderr
    assert "failed 3 times" in out.stdout + out.stderr  # retried (max_retries 2), then failed
    manifest = json.loads((run / "verify" / "_manifest.json").read_text())
    assert manifest["status"] != "complete"
    assert not (run / "filter").exists()
