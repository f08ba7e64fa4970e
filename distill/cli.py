"""Command line: `distill run | generate | curate | train | export | eval | report | config`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from distill.config import ENGINE_CONFIGS, ConfigError, explain, load_config

_OVERRIDES_HELP = "dotted overrides, e.g. generate.n_samples=8 run.dir=runs/big (values are YAML)"
_EPILOG = "Every config key, with its type, default and meaning: `distill config explain [PREFIX]`."

_CONFIG_COMMANDS = {
    "run": "run every stage in run.stages",
    "generate": "ingest the source and run teacher generation only",
    "curate": "run the curation stages (verify, filter, dedup, decontam, sft) on RUN/generate",
    "train": "fine-tune the student on the SFT set (train.data, or RUN/sft) and export it",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distillation pipelines for reasoning models.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in _CONFIG_COMMANDS.items():
        c = sub.add_parser(name, help=help_, epilog=_EPILOG)
        c.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
        c.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
        c.add_argument("--dry-run", action="store_true",
                       help="validate, check inputs offline, print the resolved config and plan (Ray resources per "
                            "stage, training parallelism, memory per GPU); run nothing. Exit 1 if the plan is "
                            "impossible")
        if name == "curate":
            c.add_argument("--steps", default=None,
                           help="comma-separated subset of verify,filter,dedup,decontam,sft (default: all)")
    ex = sub.add_parser("export", help="write a Hugging Face model directory from a training checkpoint")
    ex.add_argument("checkpoint", help="a checkpoint directory (RUN/train/checkpoints/step-N) or RUN/train/checkpoints")
    ex.add_argument("out", help="output directory for safetensors, config, tokenizer and chat template")
    ex.add_argument("--max-shard-size-mb", type=int, default=2000, help="largest safetensors file (MB)")
    ex.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="dtype of the written weights (auto: the training precision)")
    _chaos_parser(sub)
    ev = sub.add_parser("eval", help="greedy accuracy, pass@k and maj@k of a model on benchmarks",
                        description="Evaluate MODEL with the same answer extraction and verifier as curation; "
                                    "writes OUT/results.json and OUT/records.jsonl (every completion and verdict).")
    ev.add_argument("model", help="a local model directory, a Hub id, smollm2-135m-instruct, a run's exported "
                                  "model (RUN/model), or the served model's name with --engine openai")
    ev.add_argument("--benchmarks", required=True,
                    help="comma-separated: NAME (NAME.jsonl in --benchmark-dir, else gsm8k / math500 from the Hub), "
                         "a file or directory, NAME=PATH, or a Hub dataset id")
    ev.add_argument("--benchmark-dir", default=None, help="directory holding NAME.jsonl / NAME.parquet benchmark files")
    ev.add_argument("--engine", choices=tuple(ENGINE_CONFIGS), default="hf", help="generation engine (default hf)")
    ev.add_argument("--base-url", default="", help="--engine openai: the server root, e.g. http://127.0.0.1:8000/v1")
    ev.add_argument("--samples", type=int, default=0, help="sampled completions per question for pass@k / maj@k "
                                                           "(default 0: greedy only)")
    ev.add_argument("--k", default=None, help="comma-separated k values (default: 1, 2, 4, ... and --samples)")
    ev.add_argument("--no-greedy", action="store_true", help="skip the greedy completion per question")
    ev.add_argument("--limit", type=int, default=None, help="first Q questions of each benchmark")
    ev.add_argument("--temperature", type=float, default=0.6, help="sampling temperature of the samples")
    ev.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass of the samples")
    ev.add_argument("--max-new-tokens", type=int, default=1024, help="longest completion (tokens)")
    ev.add_argument("--seed", type=int, default=0, help="base seed of the samples")
    ev.add_argument("--batch-size", type=int, default=16, help="--engine hf: sequences decoded together")
    ev.add_argument("--template", default=None, help="user message with {problem} (default: reason step by step, "
                                                     "answer in \\boxed{})")
    ev.add_argument("--out", default=None, help="output directory (default eval/<model name>)")
    rep = sub.add_parser("report", help="funnel table of a run, plus report.json and report.html")
    rep.add_argument("run_dir", help="a run directory (run.dir of the config)")
    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print the resolved config (file + overrides + defaults)")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    exp = cfg.add_parser("explain", help="list every key with its type, default and docstring")
    exp.add_argument("prefix", nargs="?", default="", help="only keys under this dotted prefix, e.g. generate.openai")
    return p


def _stages(args, cfg) -> list[str]:
    from distill.config import CURATE_STAGES

    if args.command == "generate":
        return ["generate"]
    if args.command == "train":
        return ["train"]
    if args.command == "curate":
        steps = args.steps.split(",") if args.steps else list(CURATE_STAGES)
        bad = [s for s in steps if s not in CURATE_STAGES]
        if bad:
            raise ConfigError([f"--steps: unknown step(s) {', '.join(bad)}; known: {', '.join(CURATE_STAGES)}"])
        return [s for s in CURATE_STAGES if s in steps]
    return list(cfg.run.stages)


def _chaos_parser(sub) -> None:
    ch = sub.add_parser("chaos", help="fault injection against your own servers and Ray cluster")
    chs = ch.add_subparsers(dest="chaos_command", required=True)
    px = chs.add_parser("proxy", help="proxy an OpenAI-compatible server, failing a share of requests",
                        description="Point generate.openai.base_url at the printed URL; on exit (Ctrl-C, SIGTERM or "
                                    "--duration) the faults injected and the client retries they explain are printed.")
    px.add_argument("--upstream", required=True, help="the real server, e.g. http://127.0.0.1:8000/v1")
    px.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    px.add_argument("--port", type=int, default=8001, help="port to listen on (0: any free port)")
    px.add_argument("--rate", type=float, default=0.2, help="share of requests that get a fault (0..1)")
    px.add_argument("--mix", default="429=1,500=1,503=1,timeout=1,reset=1,malformed=1",
                    help="relative weights of the faults: 429, 500, 503, timeout, reset, malformed")
    px.add_argument("--hold-s", type=float, default=30.0,
                    help="a timeout fault holds the request this long, then drops it (set above the client timeout)")
    px.add_argument("--retry-after-s", type=float, default=1.0, help="Retry-After of 429 and 503 answers (seconds)")
    px.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    px.add_argument("--duration", default=None, help="stop after this long (e.g. 10m); default: until Ctrl-C")
    kl = chs.add_parser("kill", help="SIGKILL random Ray actors (and a worker node) of a running cluster")
    kl.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else auto)")
    kl.add_argument("--actors", required=True, help="regex on the actor class name, e.g. TeacherReplica")
    kl.add_argument("--every", default="5s", help="pause between kills, e.g. 5s, 500ms, 1m")
    kl.add_argument("--count", type=int, default=3, help="actors to kill")
    kl.add_argument("--node", action="store_true",
                    help="also kill one random worker node's raylet halfway through (never the head or a driver's node)")
    kl.add_argument("--seed", type=int, default=0, help="seed of the victim choice")
    kl.add_argument("--max-wait", default="10m", help="give up after this long in all (no matching actor appears)")


def _chaos(args) -> int:
    import json
    import os
    import signal
    import threading

    from distill import chaos

    try:
        if args.chaos_command == "proxy":
            faults = chaos.ProxyFaults(rate=args.rate, mix=chaos.parse_mix(args.mix), seed=args.seed,
                                       hold_s=args.hold_s, retry_after_s=args.retry_after_s)
            duration = chaos.parse_duration(args.duration) if args.duration else None
        else:
            every, max_wait = chaos.parse_duration(args.every), chaos.parse_duration(args.max_wait)
    except ValueError as e:
        raise ConfigError([f"chaos {args.chaos_command}: {e}"]) from None
    if args.chaos_command == "proxy":
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        with chaos.FaultProxy(args.upstream, faults, host=args.host, port=args.port) as proxy:
            print(f"chaos proxy: {proxy.base_url} -> {args.upstream}, rate {faults.rate:g}, mix {dict(faults.mix)}",
                  flush=True)
            stop.wait(duration)
        print("chaos proxy: " + json.dumps({**proxy.counts(),
                                            "expected_client_retries": dict(chaos.expected_retries(proxy.injected))}))
        return 0
    import ray

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    kills = chaos.run_killer(args.actors, every_s=every, count=args.count, node=args.node, seed=args.seed,
                             max_wait_s=max_wait, say=lambda m: print(m, flush=True))
    print(f"chaos kill: {sum(k.what == 'actor' for k in kills)} actors, {sum(k.what == 'node' for k in kills)} nodes")
    return 0 if len(kills) >= args.count + int(args.node) else 1


def _dry_run(cfg, stages: list[str]) -> int:
    from distill.plan import format_plan, resolve_plan

    plan = resolve_plan(cfg, stages)
    print("\n# plan\n" + format_plan(plan))
    if plan.problems:
        print(f"distill: the plan has {len(plan.problems)} problem(s):\n"
              + "\n".join(f"  - {p}" for p in plan.problems), file=sys.stderr)
        return 1
    return 0


def _eval(args) -> int:
    from pydantic import ValidationError

    from distill.config import EvalConfig
    from distill.evaluate import EvalRun, ModelSpec, evaluate, load_eval_set, resolve_benchmark, write_json, write_records

    try:
        refs = [resolve_benchmark(b, args.benchmark_dir) for b in args.benchmarks.split(",") if b.strip()]
        ks = [int(k) for k in args.k.split(",")] if args.k else []
        ev = EvalConfig(benchmarks=refs, limit=args.limit, greedy=not args.no_greedy, samples=args.samples, k=ks,
                        sampling={"temperature": args.temperature, "top_p": args.top_p,
                                  "max_new_tokens": args.max_new_tokens, "seed": args.seed},
                        **({"prompt": {"template": args.template}} if args.template else {}))
        # The flags that set engine-specific fields; every other field keeps its default.
        extra = {"hf": {"batch_size": args.batch_size}, "openai": {"base_url": args.base_url}}.get(args.engine, {})
        engine_cfg = ENGINE_CONFIGS[args.engine](model=args.model, **extra)
    except ValidationError as e:
        raise ConfigError([m for err in e.errors() for m in err["msg"].removeprefix("Value error, ").split("\n")]) from None
    except ValueError as e:  # a --k item that is not a number
        raise ConfigError([f"--k={args.k}: comma-separated integers expected ({e})"]) from None
    if args.engine == "openai" and not args.base_url:
        raise ConfigError(["--engine openai needs --base-url (the server root, e.g. http://127.0.0.1:8000/v1)"])
    sets = [load_eval_set(ref, ev.limit) for ref in ev.benchmarks]
    run = EvalRun(prompt=ev.prompt, sampling=ev.sampling, greedy=ev.greedy, samples=ev.samples, ks=ev.k_values())
    out = Path(args.out or Path("eval") / Path(args.model.rstrip("/")).name)
    result, records = evaluate(ModelSpec(args.engine, engine_cfg), sets, run)
    result["records"] = "records.jsonl"
    write_records(out / "records.jsonl", records)
    print(f"eval: results in {write_json(out / 'results.json', result)}; every completion in {out / 'records.jsonl'}")
    return 0


def _report(run_dir: str) -> int:
    from distill.report import format_table, write_report

    report, json_path, html_path = write_report(run_dir)
    print(format_table(report))
    print(f"\nreport: {json_path} and {html_path}")
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors already phrased for the user: one line on stderr and exit 1, no traceback.
    Imported lazily so `distill config ...` does not import Ray or the stages."""
    from distill.curate.benchmarks import BenchmarkError
    from distill.export.hf import ExportError
    from distill.raypool import ShardFailed
    from distill.sources import SourceError
    from distill.store import MissingInputError, StaleOutputError

    return (StaleOutputError, SourceError, ShardFailed, MissingInputError, BenchmarkError, ExportError,
            FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "config" and args.action == "explain":
            lines = [ln for ln in explain() if ln.strip().startswith(args.prefix)]
            if not lines:
                print(f"no config key starts with {args.prefix!r}", file=sys.stderr)
                return 2
            print("\n".join(lines))
            return 0
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "eval":
            return _eval(args)
        if args.command == "chaos":
            return _chaos(args)
        if args.command == "export":
            from distill.export.hf import export_checkpoint

            out = export_checkpoint(Path(args.checkpoint), Path(args.out),
                                    max_shard_size_mb=args.max_shard_size_mb, dtype=args.dtype)
            print(f"export: wrote {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
            return 0
        cfg = load_config(args.config, args.overrides, require_source=args.command not in ("train", "curate"))
        if args.command == "config" or args.dry_run:
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return _dry_run(cfg, _stages(args, cfg)) if args.command != "config" else 0
        stages = _stages(args, cfg)
        if "generate" in stages and cfg.source is None and cfg.mix is None:
            raise ConfigError(["source: required when the generate stage runs (the seed questions)"])
        from distill.pipeline import run_pipeline

        run_pipeline(cfg, stages)
        return 0
    except ConfigError as e:
        print(f"distill: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"distill: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
