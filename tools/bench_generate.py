"""Generation throughput, measured side by side in one run.

1. hf engine: the same GSM8K prompts decoded in batches vs one prompt at a time (what a plain
   `model.generate` loop does), greedy so both produce the same tokens.
2. openai engine against the loopback fault server (each request held `--latency` seconds, as a
   model would): the engine vs a bare aiohttp client firing at the same concurrency (the
   server's ceiling for that concurrency), and vs a sequential request loop.

    python tools/bench_generate.py                  # both, a few minutes on 2 CPU cores
    python tools/bench_generate.py --skip-hf        # openai part only (seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO.parent / "shared" / "data" / "train" / "gsm8k_train.jsonl"


def load_problems(n: int) -> list[str]:
    from distill.fsio import read_jsonl

    return [r["problem"] for r in read_jsonl(SEEDS)[:n]]


def bench_hf(problems: list[str], max_new_tokens: int, batch_size: int) -> list[dict]:
    from distill.config import HFEngineConfig
    from distill.teachers.base import Request, SamplingParams
    from distill.teachers.hf import HFEngine

    requests = [Request([{"role": "user", "content": p}], n=1, seed=i) for i, p in enumerate(problems)]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    rows = []
    engine = HFEngine(HFEngineConfig(batch_size=batch_size))
    engine.generate(requests[:2], params)  # warm-up: first-call allocations, thread pools
    for label, bs in ((f"hf batched (batch_size={batch_size})", batch_size), ("hf one prompt at a time", 1)):
        engine.cfg = engine.cfg.model_copy(update={"batch_size": bs})
        start = time.perf_counter()
        results = engine.generate(requests, params)
        dt = time.perf_counter() - start
        tokens = sum(r.completions[0].completion_tokens for r in results)
        rows.append({"what": label, "samples": len(results), "tokens": tokens, "seconds": dt,
                     "samples/s": len(results) / dt, "tokens/s": tokens / dt})
    engine.close()
    return rows


async def _raw_client(base_url: str, bodies: list[dict], concurrency: int) -> int:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with aiohttp.ClientSession() as session:
        async def one(body):
            nonlocal tokens
            async with sem, session.post(f"{base_url}/chat/completions", json=body) as r:
                tokens += (await r.json())["usage"]["completion_tokens"]
        await asyncio.gather(*(one(b) for b in bodies))
    return tokens


def bench_openai(n: int, latency: float, concurrency: int, max_new_tokens: int) -> list[dict]:
    from distill.config import OpenAIEngineConfig
    from distill.teachers.base import Request, SamplingParams
    from distill.teachers.openai import OpenAIEngine, chat_body
    from distill.testing.fault_server import FaultServer

    problems = [f"bench question {i}" for i in range(n)]
    params = SamplingParams(temperature=0.7, max_new_tokens=max_new_tokens)
    rows = []

    def row(label, samples, tokens, dt):
        return {"what": label, "samples": samples, "tokens": tokens, "seconds": dt,
                "samples/s": samples / dt, "tokens/s": tokens / dt}

    with FaultServer(latency_s=latency) as server:
        bodies = [chat_body("m", [{"role": "user", "content": p}], params, i) for i, p in enumerate(problems)]
        start = time.perf_counter()
        tokens = asyncio.run(_raw_client(server.base_url, bodies, concurrency))
        rows.append(row(f"bare aiohttp client, concurrency {concurrency} (ceiling)", n, tokens, time.perf_counter() - start))

        cfg = OpenAIEngineConfig(base_url=server.base_url, model="m", concurrency=concurrency, api_key_env=None)
        with OpenAIEngine(cfg) as engine:
            requests = [Request([{"role": "user", "content": p}], n=1, seed=i) for i, p in enumerate(problems)]
            start = time.perf_counter()
            results = engine.generate(requests, params)
            dt = time.perf_counter() - start
        tokens = sum(r.completions[0].completion_tokens for r in results)
        rows.append(row(f"openai engine, concurrency {concurrency}", n, tokens, dt))

        seq_n = max(1, min(n, int(5 / max(latency, 1e-3))))  # ~5 s of sequential requests
        start = time.perf_counter()
        tokens = asyncio.run(_raw_client(server.base_url, bodies[:seq_n], 1))
        rows.append(row("sequential requests (one at a time)", seq_n, tokens, time.perf_counter() - start))
    return rows


def print_table(title: str, rows: list[dict], baseline: int) -> None:
    print(f"\n{title}\n")
    print("| what | samples | tokens | seconds | samples/s | tokens/s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = rows[baseline]["samples/s"]
    for r in rows:
        print(f"| {r['what']} | {r['samples']} | {r['tokens']} | {r['seconds']:.2f} | {r['samples/s']:.2f} "
              f"| {r['tokens/s']:.1f} | {r['samples/s'] / base:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-prompts", type=int, default=16)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--hf-max-new-tokens", type=int, default=64)
    p.add_argument("--openai-requests", type=int, default=2000)
    p.add_argument("--latency", type=float, default=0.05, help="seconds the server holds each request")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-openai", action="store_true")
    args = p.parse_args(argv)
    print(f"command: python tools/bench_generate.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    if not args.skip_openai:
        rows = bench_openai(args.openai_requests, args.latency, args.concurrency, 64)
        print_table(f"openai engine vs loopback server ({args.latency * 1000:.0f} ms per request); ratio vs sequential",
                    rows, baseline=2)
        print(f"\nengine / ceiling: {rows[1]['samples/s'] / rows[0]['samples/s']:.2f}")
    if not args.skip_hf:
        rows = bench_hf(load_problems(args.hf_prompts), args.hf_max_new_tokens, args.hf_batch_size)
        print_table(f"hf engine, SmolLM2-135M-Instruct, {args.hf_prompts} GSM8K prompts, greedy, "
                    f"{args.hf_max_new_tokens} new tokens; ratio vs one at a time", rows, baseline=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
