"""Stage `eval`: teacher, student before training and student after training on held-out benchmarks.

Writes RUN/eval/results.json ({benchmarks: {name: {sha256, files, n_questions}}, models: {role:
results of `distill.evaluate.evaluate` plus `key`, `records`, `same_as`}}) and one
RUN/eval/<role>.records.jsonl per evaluated model (every completion, its answer and verdict).

Resumable per model: a model whose key (engine settings, weights hash, benchmark hashes, eval
settings) matches the stored one is not evaluated again. Models with equal keys apart from their
role (the teacher is also the student's starting point in a self-distillation run) are evaluated
once; the later role records `same_as`. Each evaluation runs as one Ray task that reserves the
engine's CPUs and GPUs, so on a cluster it lands on a node that has them.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.config import ConfigError, RunConfig, fingerprint
from distill.stages import ActorAsk, Stage
from distill.evaluate import (
    EvalRun, EvalSet, ModelSpec, evaluate, format_scores, load_eval_set, model_fingerprint, write_json, write_records,
)

RESULTS = "results.json"


def eval_sets(cfg: RunConfig) -> list[EvalSet]:
    return [load_eval_set(ref, cfg.eval.limit) for ref in cfg.eval.benchmarks]


def resources(cfg: RunConfig) -> ActorAsk:
    ev = cfg.eval
    return ActorAsk(1, ev.cpus, ev.gpus, f"one Ray task per model, in turn ({', '.join(ev.models)}) on "
                                         f"{len(ev.benchmarks)} benchmark(s); the teacher's task takes generate's "
                                         "replica resources")


def preflight(cfg: RunConfig) -> None:
    """Benchmark files and answers are read before any stage runs (a typo fails in seconds)."""
    eval_sets(cfg)
    if "student_after" in cfg.eval.models and "train" not in cfg.run.stages and not _student_dir(cfg).is_dir():
        raise ConfigError([f"eval.models includes student_after, but {_student_dir(cfg)} does not exist and "
                           "run.stages has no train stage: train first, or drop student_after from eval.models"])


def _student_dir(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    return Path(cfg.train.export.dir or Path(run_dir or cfg.run.dir) / "model")


def plan_models(cfg: RunConfig, run_dir: Path) -> list[tuple[str, ModelSpec, dict]]:
    """(role, model, Ray resources) for every model in eval.models, in table order."""
    ev, gen = cfg.eval, cfg.generate
    student_cfg = getattr(gen, ev.student_engine)
    # Absolute: the models are loaded in Ray tasks, whose working directory is not the driver's.
    before = cfg.train.student.model
    before = str(Path(before).resolve()) if Path(before).exists() else before
    students = {"student_before": before, "student_after": str(_student_dir(cfg, run_dir).resolve())}
    plan = []
    for role in ("teacher", "student_before", "student_after"):
        if role not in ev.models:
            continue
        if role == "teacher":
            plan.append((role, ModelSpec(gen.engine, gen.engine_config()),
                         {"num_cpus": gen.cpus_per_replica, "num_gpus": gen.gpus_per_replica}))
        else:
            spec = ModelSpec(ev.student_engine, student_cfg.model_copy(update={"model": students[role]}))
            plan.append((role, spec, {"num_cpus": ev.cpus, "num_gpus": ev.gpus}))
    return plan


def model_key(spec: ModelSpec, run: EvalRun, sets: list[EvalSet]) -> str:
    """What decides a model's scores: its settings and weights, the eval settings, the questions."""
    return fingerprint({"model": spec.settings(), "weights": model_fingerprint(spec.config.model),
                        "eval": run.settings(), "benchmarks": {s.name: [s.sha256, len(s.items)] for s in sets}})


def _evaluate_task(spec: ModelSpec, sets: list[EvalSet], run: EvalRun) -> tuple[dict, list[dict]]:
    import faulthandler
    import sys

    faulthandler.enable(file=sys.stderr, all_threads=True)
    return evaluate(spec, sets, run, log=lambda m: print(m, flush=True))


def run(cfg: RunConfig, run_dir: Path) -> dict:
    import ray

    ev = cfg.eval
    out_dir = Path(run_dir) / "eval"
    if not ev.benchmarks:
        print("eval: no benchmarks configured (eval.benchmarks); nothing to evaluate", flush=True)
        return {}
    sets = eval_sets(cfg)
    run_spec = EvalRun(prompt=ev.prompt, sampling=ev.sampling, greedy=ev.greedy, samples=ev.samples,
                       ks=ev.k_values(), verify=cfg.curate.verify)
    path = out_dir / RESULTS
    stored = json.loads(path.read_text()).get("models", {}) if path.is_file() else {}
    results = {"benchmarks": {s.name: {"sha256": s.sha256, "files": s.files, "n_questions": len(s.items),
                                       "total_questions": s.total} for s in sets},
               "eval": run_spec.settings(), "models": {}}
    by_key: dict[str, str] = {}
    for role, spec, resources in plan_models(cfg, run_dir):
        if role == "student_after" and not Path(spec.config.model).is_dir():
            raise FileNotFoundError(f"eval: the trained student {spec.config.model} does not exist; run the train "
                                    "stage first (or drop student_after from eval.models)")
        key = model_key(spec, run_spec, sets)
        if key in by_key:
            first = by_key[key]
            results["models"][role] = {**results["models"][first], "same_as": first}
            print(f"eval: {role} is the same model with the same settings as {first}; its scores are reused", flush=True)
        elif stored.get(role, {}).get("key") == key and (out_dir / stored[role]["records"]).is_file():
            results["models"][role] = stored[role]
            print(f"eval: {role} ({spec.name}) already evaluated with these settings; reused", flush=True)
        else:
            print(f"eval: {role} ({spec.name}) on {', '.join(s.name for s in sets)}", flush=True)
            task = ray.remote(_evaluate_task).options(**resources, max_retries=0)
            result, records = ray.get(task.remote(spec, sets, run_spec))
            records_name = f"{role}.records.jsonl"
            write_records(out_dir / records_name, [{"role": role, **r} for r in records])
            results["models"][role] = {**result, "key": key, "records": records_name, "same_as": None}
        by_key.setdefault(key, role)
        # Written after every model: a crash in the next one keeps what is done.
        write_json(path, results)
    for role, r in results["models"].items():
        for name, scores in r["benchmarks"].items():
            print(f"eval: {role:<14} {name:<12} {format_scores(scores)}", flush=True)
    print(f"eval: results in {path}", flush=True)
    return results


STAGE = Stage("eval", "eval", run, resources, preflight=preflight, shards=False)
