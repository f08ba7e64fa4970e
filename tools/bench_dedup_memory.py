"""Peak memory and time of the dedup stage's driver step (`distill.stages.dedup._decide`) as the
number of questions grows, on synthetic sketch files shaped like the stage's own (64 partitions,
default 0.8 / 128 permutations: 21 band columns, random values, so no candidates: the floor
every run pays). Each size runs in a fresh process so ru_maxrss is its own.

    .venv/bin/python tools/bench_dedup_memory.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = 64


def write_sketches(root: Path, n: int) -> list[Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.curate.dedup import DedupConfig, lsh_params

    cfg = DedupConfig()
    bands = lsh_params(cfg.threshold, cfg.num_perm)[0]
    rng = np.random.default_rng(0)
    m = n // PARTS
    for p in range(PARTS):
        ids = range(p * m, (p + 1) * m)
        cols = {"ordinal": pa.array(np.fromiter(ids, dtype=np.int64)), "id": pa.array([f"q{i}" for i in ids]),
                "norm": pa.array(["a normalised question of about forty words " * 6] * m),
                "exact": pa.array(rng.integers(0, 2**63, m, dtype=np.uint64)),
                "sig": pa.array([bytes(4 * cfg.num_perm)] * m, pa.binary())}
        for b in range(bands):
            cols[f"b{b}"] = pa.array(rng.integers(0, 2**63, m, dtype=np.uint64))
        pq.write_table(pa.table(cols), root / f"lsh-p{p:05d}.parquet")
    return sorted(root.glob("*.parquet"))


def measure(n: int) -> dict:
    from distill.curate.dedup import DedupConfig
    from distill.stages.dedup import _decide

    with tempfile.TemporaryDirectory() as d:
        files = write_sketches(Path(d), n)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        _decide(files, DedupConfig())
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"questions": n, "seconds": round(seconds, 2), "peak_rss_mib": peak // 1024,
            "above_start_mib": max(0, peak - base) // 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    print("| questions | decide s | peak RSS MiB | above the process's start MiB |\n|---:|---:|---:|---:|")
    for n in (int(x) for x in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['questions']:,} | {r['seconds']} | {r['peak_rss_mib']} | {r['above_start_mib']} |", flush=True)


if __name__ == "__main__":
    main()
