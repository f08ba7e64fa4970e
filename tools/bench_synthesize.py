"""Synthesis throughput through the `openai` engine against the loopback fault server, side by
side with the engine's ceiling, in one run.

The server holds every request `--latency` seconds (as a model would) and answers synthesis and
concept-extraction prompts deterministically. Rows:

1. the ceiling: `concurrency / latency` requests/s, what an engine that keeps `concurrency`
   requests in flight at all times could do;
2. a bare aiohttp client firing the same synthesis prompts at the same concurrency (what this
   machine and server actually allow);
3. `synthesize_unit` (augment + persona tasks of GSM8K seeds: prompt building, the engine,
   reply parsing, rows) in units of `--unit` tasks, one unit after another as one stage replica
   runs them;
4. the concept-extraction pass (`extract_unit`) the same way.

    python tools/bench_synthesize.py                      # ~15 s on 2 CPU cores
    python tools/bench_synthesize.py --latency 0.2 --concurrency 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO.parent / "shared" / "data" / "train" / "gsm8k_train.jsonl"


def load_seeds(n: int) -> list[dict]:
    with open(SEEDS) as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    return [{"id": r["id"], "problem": r["problem"], "answer": r["answer"], "source": "gsm8k"} for r in rows]


async def _raw_client(base_url: str, bodies: list[dict], concurrency: int) -> None:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:
        async def one(body):
            async with sem, session.post(f"{base_url}/chat/completions", json=body) as r:
                await r.json()
        await asyncio.gather(*(one(b) for b in bodies))


def bench(n_seeds: int, latency: float, concurrency: int, unit: int) -> list[dict]:
    from distill.config import OpenAIEngineConfig
    from distill.curate.synthesis import (
        METHODS, PlanContext, SynthesizeConfig, extract_unit, persona_rows, plan_tasks, read_personas, synthesize_unit,
    )
    from distill.teachers.base import SamplingParams
    from distill.teachers.openai import OpenAIEngine, chat_body
    from distill.testing.fault_server import FaultServer

    seeds = load_seeds(n_seeds)
    cfg = SynthesizeConfig(methods=["augment", "persona"], keep_seeds=False)
    personas, _ = read_personas(persona_rows(cfg.persona), "persona")
    tasks = list(plan_tasks(seeds, PlanContext(cfg, {"augment": "bench", "persona": "bench"}, personas)))
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_tokens, seed=0)
    rows = [{"what": f"ceiling: concurrency {concurrency} / latency {latency * 1000:.0f} ms", "requests": None,
             "seconds": None, "req/s": concurrency / latency}]

    def row(label, n, dt, **extra):
        rows.append({"what": label, "requests": n, "seconds": dt, "req/s": n / dt, **extra})

    with FaultServer(latency_s=latency) as server:
        bodies = [chat_body("m", METHODS[t.method].messages(t), params, t.seed) for t in tasks]
        start = time.perf_counter()
        asyncio.run(_raw_client(server.base_url, bodies, concurrency))
        row(f"bare aiohttp client, concurrency {concurrency}", len(bodies), time.perf_counter() - start)

        ecfg = OpenAIEngineConfig(base_url=server.base_url, model="m", concurrency=concurrency, api_key_env=None)
        with OpenAIEngine(ecfg) as engine:
            start, kept, rejected = time.perf_counter(), 0, 0
            for i in range(0, len(tasks), unit):
                k, r = synthesize_unit(engine, tasks[i:i + unit], params, "openai:m", False)
                kept, rejected = kept + len(k), rejected + len(r)
            row(f"synthesize_unit (augment x3 + persona), units of {unit}", len(tasks), time.perf_counter() - start,
                kept=kept, rejected=rejected)

            xparams = SamplingParams(temperature=0.0, max_new_tokens=cfg.concept_graph.extract_max_tokens, seed=0)
            start, kept, rejected = time.perf_counter(), 0, 0
            for i in range(0, len(seeds), unit):
                k, r = extract_unit(engine, seeds[i:i + unit], xparams, "openai:m")
                kept, rejected = kept + len(k), rejected + len(r)
            row(f"extract_unit (concepts), units of {unit}", len(seeds), time.perf_counter() - start,
                kept=kept, rejected=rejected)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=500, help="GSM8K seeds (4 synthesis requests each)")
    p.add_argument("--latency", type=float, default=0.1, help="seconds the server holds each request")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (the engine's `concurrency`)")
    p.add_argument("--unit", type=int, default=256, help="tasks per unit (questions.synthesize.shard_size)")
    args = p.parse_args(argv)
    print(f"command: python tools/bench_synthesize.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    rows = bench(args.seeds, args.latency, args.concurrency, args.unit)
    ceiling = rows[0]["req/s"]
    print("\n| what | requests | seconds | requests/s | of ceiling | kept / rejected |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        split = f"{r['kept']} / {r['rejected']}" if "kept" in r else "-"
        print(f"| {r['what']} | {r['requests'] or '-'} | {seconds} | {r['req/s']:.1f} | {r['req/s'] / ceiling:.0%} "
              f"| {split} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
