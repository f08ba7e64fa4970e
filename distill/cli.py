"""Command line: `distill run | generate | curate | train | export | report | config`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from distill.config import ConfigError, explain, load_config

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
        c.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, run nothing")
        if name == "curate":
            c.add_argument("--steps", default=None,
                           help="comma-separated subset of verify,filter,dedup,decontam,sft (default: all)")
    ex = sub.add_parser("export", help="write a Hugging Face model directory from a training checkpoint")
    ex.add_argument("checkpoint", help="a checkpoint directory (RUN/train/checkpoints/step-N) or RUN/train/checkpoints")
    ex.add_argument("out", help="output directory for safetensors, config, tokenizer and chat template")
    ex.add_argument("--max-shard-size-mb", type=int, default=2000, help="largest safetensors file (MB)")
    ex.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="dtype of the written weights (auto: the training precision)")
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
    from distill.stages import CURATE_STAGES

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
        if args.command == "export":
            from distill.export.hf import export_checkpoint

            out = export_checkpoint(Path(args.checkpoint), Path(args.out),
                                    max_shard_size_mb=args.max_shard_size_mb, dtype=args.dtype)
            print(f"export: wrote {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "config" or args.dry_run:
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        stages = _stages(args, cfg)
        if "generate" in stages and cfg.source is None:
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
