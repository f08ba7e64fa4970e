"""Command line: `distill run | generate | config show | config explain`."""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from distill.config import ConfigError, explain, load_config

_OVERRIDES_HELP = "dotted overrides, e.g. generate.n_samples=8 run.dir=runs/big (values are YAML)"
_EPILOG = "Every config key, with its type, default and meaning: `distill config explain [PREFIX]`."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distillation pipelines for reasoning models.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run every stage in run.stages"),
                        ("generate", "ingest the source and run teacher generation only")):
        c = sub.add_parser(name, help=help_, epilog=_EPILOG)
        c.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
        c.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
        c.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, run nothing")
    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print the resolved config (file + overrides + defaults)")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    ex = cfg.add_parser("explain", help="list every key with its type, default and docstring")
    ex.add_argument("prefix", nargs="?", default="", help="only keys under this dotted prefix, e.g. generate.openai")
    return p


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
        cfg = load_config(args.config, args.overrides)
        if args.command == "config" or args.dry_run:
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        if args.command == "generate":
            cfg.run.stages = ["generate"]
        from distill.pipeline import run_pipeline

        run_pipeline(cfg)
        return 0
    except ConfigError as e:
        print(f"distill: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from distill.raypool import ShardFailed
        from distill.sources import SourceError
        from distill.store import StaleOutputError

        if isinstance(e, (StaleOutputError, SourceError, ShardFailed)):
            print(f"distill: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
