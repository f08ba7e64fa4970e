"""Import throughput: `distill run` with stages [import] against what a user would otherwise write.

A synthetic OpenR1-Math-like JSONL (one problem per row, a list of 2-4 generations whose length in
words is lognormal, `--words` median; a list of correctness flags) is imported two ways, side by
side, on the same file:

- distill: `distill run CONFIG` (stages [import]: Ray workers read byte ranges, split `<think>`,
  count tokens with the student's tokenizer, write exactly-once shards), in a subprocess whose
  driver and Ray workers are polled for memory (tools/bench_scale.py's poller);
- baseline: `datasets.load_dataset("json")`, a batched `map` that explodes the generations into one
  row each, and a batched `map(num_proc=--workers)` that counts tokens with the same tokenizer:
  the pipeline users of open-r1 / LLaMA-Factory style trainers write by hand (no resume, no
  provenance, no quarantine).

Both count tokens with the same tokenizer (the packaged SmolLM2's) and use `--workers` processes.
Prints one JSON line per (size, variant), appended to `--out`, and a markdown table:

    .venv/bin/python tools/bench_import.py --rows 5000,20000 --out tools/data/bench_import.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from bench_scale import MemoryPoller  # noqa: E402


def write_set(path: Path, rows: int, words: int, seed: int = 0) -> int:
    """The synthetic set; returns the number of generations (samples) in it."""
    rng = random.Random(seed)
    vocab = ("so we add the two numbers then multiply by three which gives us the total and we check "
             "that the result is consistent with the constraint of the problem").split()
    n = 0
    with open(path, "w") as f:
        for i in range(rows):
            k = rng.randint(2, 4)
            n += k
            gens = []
            for g in range(k):
                length = max(20, int(rng.lognormvariate(math.log(words), 0.6)))
                body = " ".join(rng.choice(vocab) for _ in range(length))
                gens.append(f"<think>\n{body}\n</think>\n\nThe answer is $\\boxed{{{i + g}}}$.")
            f.write(json.dumps({"uuid": f"u{i}", "problem": f"Problem {i}: find the value of x if x = {i}.",
                                "answer": str(i), "generations": gens,
                                "correctness_math_verify": [g == 0 for g in range(k)]}) + "\n")
    return n


BASELINE = r'''
import sys, time
from datasets import load_dataset
from transformers import AutoTokenizer
from distill.teachers.models import resolve_model
path, workers = sys.argv[1], int(sys.argv[2])
tok_path = resolve_model("smollm2-135m-instruct")
ds = load_dataset("json", data_files=path, split="train")
def explode(batch):
    out = {"id": [], "problem": [], "answer": [], "completion": [], "sample_idx": []}
    for qid, p, a, gens in zip(batch["uuid"], batch["problem"], batch["answer"], batch["generations"]):
        for i, g in enumerate(gens):
            out["id"].append(qid); out["problem"].append(p); out["answer"].append(a)
            out["completion"].append(g); out["sample_idx"].append(i)
    return out
ds = ds.map(explode, batched=True, remove_columns=ds.column_names)
tok = AutoTokenizer.from_pretrained(tok_path)
def count(batch):
    return {"n_tokens": [len(x) for x in tok(batch["completion"], add_special_tokens=False)["input_ids"]]}
ds = ds.map(count, batched=True, num_proc=workers)
ds.to_parquet(sys.argv[3])
print("samples", len(ds), "tokens", sum(ds["n_tokens"]))
'''


def run_polled(cmd: list[str], cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess, MemoryPoller]:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    poller = MemoryPoller(proc.pid).start()
    out, _ = proc.communicate()
    poller.stop()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out[-3000:]}")
    return wall, subprocess.CompletedProcess(cmd, proc.returncode, out, ""), poller


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="5000,20000", help="comma-separated problem counts")
    ap.add_argument("--words", type=int, default=400, help="median words per generation")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    results = []
    for rows in [int(x) for x in args.rows.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
            tmp = Path(tmp)
            data = tmp / "set.jsonl"
            samples = write_set(data, rows, args.words)
            mb = data.stat().st_size / (1 << 20)
            import yaml

            cfg = {"run": {"dir": str(tmp / "run"), "stages": ["import"], "progress": False},
                   "ray": {"num_cpus": args.workers}, "curate": {"workers": args.workers},
                   "traces": {"sources": [{"path": str(data), "name": "synthetic", "teacher": "r1",
                                           "columns": {"id": "uuid", "completion": "generations",
                                                       "correct": "correctness_math_verify"}}]}}
            (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
            wall, out, poll = run_polled([sys.executable, "-m", "distill.cli", "run", str(tmp / "cfg.yaml")], REPO, env)
            manifest = json.loads((tmp / "run" / "import" / "_manifest.json").read_text())
            assert manifest["counts"]["records"] == samples, (manifest["counts"], samples)
            stage_s = manifest["summary"]["seconds"]
            worker = poll.largest_worker()
            results.append({"variant": "distill import", "rows": rows, "samples": samples, "mb": round(mb, 1),
                            "wall_s": round(wall, 1), "stage_s": stage_s,
                            "samples_per_s": round(samples / stage_s, 1), "mb_per_s": round(mb / stage_s, 2),
                            "driver_peak_mib": round(max(poll.driver.rss, poll.driver.hwm) / 1024),
                            "largest_worker_mib": round(max(worker.rss, worker.hwm) / 1024) if worker else None})
            script = tmp / "baseline.py"
            script.write_text(BASELINE)
            wall_b, out_b, poll_b = run_polled([sys.executable, str(script), str(data), str(args.workers),
                                                str(tmp / "baseline.parquet")], REPO,
                                               {**env, "HF_DATASETS_CACHE": str(tmp / "hf-cache")})
            got = int(out_b.stdout.split("samples", 1)[1].split()[0])
            assert got == samples, (got, samples)
            peak_b = max(poll_b.driver.rss, poll_b.driver.hwm)
            results.append({"variant": "datasets map baseline", "rows": rows, "samples": samples, "mb": round(mb, 1),
                            "wall_s": round(wall_b, 1), "stage_s": None,
                            "samples_per_s": round(samples / wall_b, 1), "mb_per_s": round(mb / wall_b, 2),
                            "driver_peak_mib": round(peak_b / 1024), "largest_worker_mib": None})
            for r in results[-2:]:
                r.update({"date": datetime.date.today().isoformat(), "commit": commit, "words": args.words,
                          "workers": args.workers})
                print(json.dumps(r), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(r) + "\n")
    print("\n| variant | problems | samples | MB | wall s | samples/s | MB/s | driver peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['rows']:,} | {r['samples']:,} | {r['mb']} | {r['wall_s']} | "
              f"{r['samples_per_s']} | {r['mb_per_s']} | {r['driver_peak_mib']} |")


if __name__ == "__main__":
    main()
