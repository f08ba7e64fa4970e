"""Token-cache build time, serial vs parallel, side by side in one run.

Writes GSM8K-train chats (question -> reference solution, ~230 tokens each with the SmolLM2
template) as SFT JSONL, `--repeat` copies, then builds the token cache twice from scratch into
separate directories: (a) serial, every chunk in this process (what the build did before it was
parallel); (b) a local process pool of `--workers` (default: every CPU this process may use).
Prints a markdown table (seconds, tokens/s, speed-up), the machine's load average, and checks
that both caches are the same bytes.

    python tools/bench_tokenize.py                      # ~10M tokens, ~1-2 min on 2 cores
    python tools/bench_tokenize.py --repeat 10 --workers 8

The parallel time includes starting the pool (each worker imports transformers and loads the
tokenizer once, ~3-8 s), so small inputs gain less than large ones; the gain scales with the
cores that are free, not with the cores that exist.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.fsio import read_jsonl  # noqa: E402
from distill.train.data import _CHUNK_BYTES, build_token_cache, local_chunk_map, local_cpus, plan_chunks  # noqa: E402

GSM8K = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "train" / "gsm8k_train.jsonl"


def write_sft(path: Path, repeat: int) -> Path:
    chats = []
    for r in read_jsonl(GSM8K):
        chats.append(json.dumps({"messages": [{"role": "user", "content": r["problem"]},
                                              {"role": "assistant", "content": r["solution"]}]}))
    path.write_text("\n".join(chats * repeat) + "\n")
    return path


def cache_bytes(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != "_manifest.json"}


def cpu_seconds() -> float:
    """CPU time of this process. (Not of the pool's workers: the forkserver forks them, so they
    are never this process's children and getrusage does not see them.)"""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=6, help="copies of GSM8K train (7473 chats, ~1.7M tokens each)")
    ap.add_argument("--workers", type=int, default=local_cpus(), help="processes of the parallel build")
    ap.add_argument("--chunk-mb", type=float, default=_CHUNK_BYTES / 2**20, help="text per chunk (the build's default)")
    ap.add_argument("--max-len", type=int, default=2048)
    args = ap.parse_args()

    from distill.teachers.models import resolve_model

    tokenizer = resolve_model("smollm2-135m-instruct")
    chunk_bytes = int(args.chunk_mb * 2**20)
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        data = write_sft(Path(tmp) / "sft.jsonl", args.repeat)
        n_chunks = len(plan_chunks([data], chunk_bytes))
        mb = data.stat().st_size / 2**20
        load = os.getloadavg()
        rows = []
        caches = {}
        for name, map_chunks in [("serial (1 process)", None),
                                 (f"parallel ({args.workers} processes)", local_chunk_map(args.workers))]:
            start, cpu = time.perf_counter(), cpu_seconds()
            cache = build_token_cache([data], tokenizer, max_len=args.max_len, out_dir=Path(tmp) / f"cache{len(rows)}",
                                      map_chunks=map_chunks, chunk_bytes=chunk_bytes)
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
            caches[name] = cache
            rows.append((name, seconds, cpu, int(cache.lengths.sum())))
        a, b = caches.values()
        same = a.path.name == b.path.name and cache_bytes(a.path) == cache_bytes(b.path)

    print(f"{mb:.1f} MB of SFT JSONL ({args.repeat} x GSM8K train), {rows[0][3]:,} tokens, "
          f"{n_chunks} chunks of {args.chunk_mb:g} MB; {local_cpus()} CPUs usable, load average {load[0]:.1f} at start\n")
    print("| build | seconds | tokens/s | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds, _, tokens in rows:
        print(f"| {name} | {seconds:.1f} | {tokens / seconds:,.0f} | {rows[0][1] / seconds:.2f}x |")
    print(f"\nThe serial build kept {rows[0][2] / rows[0][1]:.1f} cores busy on average (the Rust tokenizer "
          "encodes each batch on several threads): that is what a pool has to beat.")
    print(f"\nsame cache (key and every shard byte for byte): {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":  # required: the pool's processes (forkserver/spawn) import this module
    main()
