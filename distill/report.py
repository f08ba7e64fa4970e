"""`distill report RUN_DIR`: one page about a run, from the records on disk.

Every number comes from files the stages wrote: the stored shards (accepted and `rejected/`) for
the data funnel, never counters kept while the stages ran, so the report is right after crashes,
resumes and partial reruns; RUN/train/ (metrics.jsonl, step_times/rank-*.jsonl, stragglers.jsonl,
goodput.json) for training; RUN/eval/results.json for the eval table; RUN/config.yaml for the exact
config. A section whose file is absent says "not recorded". Writes `report.json`
(machine-readable) and `report.html` (one self-contained page: inline SVG plots and CSS, no
scripts, no external fonts or images) into the run directory and prints the funnel table.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import statistics
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from distill.config import QUESTION_STAGES, STAGES
from distill.fsio import read_jsonl
from distill.stages import get_stage
from distill.store import MANIFEST, REJECTED, Manifest, reason_code


def funnel_stages() -> tuple[str, ...]:
    """Stage directories in pipeline order: the source, then every registered stage that writes
    exactly-once shards (and so has a funnel row). The report covers those present in the run."""
    return ("source", *(name for name in STAGES if get_stage(name).shards))


def _columns(root: Path, want: list[str], rejected: bool = False) -> dict[str, list]:
    """Columns `want` (those that exist) of a stage's accepted or rejected shards."""
    base = root / REJECTED if rejected else root
    out: dict[str, list] = {c: [] for c in want}
    for p in sorted(base.glob("part-*.parquet")):
        names = set(pq.read_schema(p).names)
        cols = [c for c in want if c in names]
        table = pq.read_table(p, columns=cols)
        for c in want:
            out[c].extend(table.column(c).to_pylist() if c in cols else [None] * table.num_rows)
    return out


def stage_stats(root: Path) -> dict:
    cols = ["id", "n_tokens"]
    acc = _columns(root, cols)
    rej = _columns(root, cols + ["reason"], rejected=True)
    m = Manifest.read(root)
    tokens = [t for t in acc["n_tokens"] if t is not None]
    return {
        "status": m.status if m else "missing manifest",
        "kept": len(acc["id"]),
        "rejected": len(rej["id"]),
        "questions_kept": len(set(acc["id"])),
        "tokens_kept": int(sum(tokens)),
        "rejected_by_reason": dict(Counter(reason_code(r) for r in rej["reason"] if r).most_common()),
        "settings": m.settings if m else {},
        "summary": m.summary if m else {},
    }


def build_report(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    stages = [s for s in funnel_stages() if (run_dir / s / MANIFEST).exists()]
    report: dict = {"run_dir": str(run_dir.resolve()), "stages": {}, "funnel": [], "lengths": {"kept": [], "rejected": []}}
    report["config"] = read_config(run_dir)
    report["train"] = summarize_train(read_train(run_dir / "train"))
    report["eval"] = read_eval(run_dir / "eval")
    if not stages:
        if not (report["config"] or report["train"] or report["eval"]):
            raise FileNotFoundError(f"{run_dir} holds no stage output (no */{MANIFEST}, train/ or eval/); "
                                    "is it a run directory?")
        report["final_records"] = None
        return report
    prev_kept = None
    for s in stages:
        st = stage_stats(run_dir / s)
        seen = st["kept"] + st["rejected"]
        st["input"] = seen
        st["yield"] = round(st["kept"] / seen, 4) if seen else None
        report["stages"][s] = st
        report["funnel"].append({"stage": s, "input": seen, "kept": st["kept"], "rejected": st["rejected"],
                                 "questions": st["questions_kept"], "tokens": st["tokens_kept"],
                                 "yield": st["yield"], "reasons": st["rejected_by_reason"]})
        prev_kept = st["kept"]
    report["final_records"] = prev_kept
    if "generate" in stages:
        report["generation"] = generation_summary(report["stages"]["generate"]["summary"])

    if "verify" in stages:
        v = _columns(run_dir / "verify", ["id", "pass_rate", "verdict", "origin", "origin_correct", "correct"])
        per_q = dict(zip(v["id"], v["pass_rate"]))
        report["pass_rate_per_question"] = [p for p in per_q.values() if p is not None]
        report["verdicts"] = dict(Counter(v["verdict"]).most_common())
        if "import" in stages:
            report["imported_flags"] = flag_agreement(v["origin"], v["origin_correct"], v["correct"])
    if "difficulty" in stages:
        report["difficulty"] = difficulty_summary(run_dir / "difficulty", report["stages"]["difficulty"])
    if "import" in stages:
        report["imported_yield"] = yield_by(run_dir, stages[stages.index("import"):], "origin")
    if "synthesize" in stages:
        # Through the question stages only: generate's samples do not carry the method.
        question_stages = [s for s in stages[stages.index("synthesize"):] if s in QUESTION_STAGES]
        report["synthesized_yield"] = yield_by(run_dir, question_stages, "method")
    last = stages[-1] if stages[-1] != "sft" else (stages[-2] if len(stages) > 1 else "sft")
    kept_lengths = [t for t in _columns(run_dir / last, ["n_tokens"])["n_tokens"] if t is not None]
    rejected_lengths = [t for s in stages if s not in ("source", "sft")
                        for t in _columns(run_dir / s, ["n_tokens"], rejected=True)["n_tokens"] if t is not None]
    report["lengths"] = {"kept": kept_lengths, "rejected": rejected_lengths}
    if "decontam" in stages:
        d = _columns(run_dir / "decontam", ["id", "bench", "bench_id", "match_method", "match_score"], rejected=True)
        hits: dict[str, set] = {}
        methods: Counter = Counter()
        for qid, bench, method in zip(d["id"], d["bench"], d["match_method"]):
            if bench:
                hits.setdefault(bench, set()).add(qid)
                methods[method] += 1
        report["decontam"] = {
            "questions_removed_by_benchmark": {b: len(q) for b, q in sorted(hits.items())},
            "samples_removed_by_method": dict(methods),
            "benchmarks": report["stages"]["decontam"]["summary"].get("benchmarks", {}),
        }
    return report


def difficulty_summary(root: Path, st: dict) -> dict:
    """The solver's view of the questions (stage `difficulty`), kept and rejected alike: a pass-rate
    histogram and the coverage curve, mean pass@k for k = 1..`samples`. A question the unanimity
    rule stopped early counts as solved (or not) at every k, as the rule assumes."""
    from distill.curate.difficulty import coverage_curve

    want = ["solver_samples", "solver_correct", "solver_pass_rate"]
    acc, rej = _columns(root, want), _columns(root, want, rejected=True)
    counts = [(n, c) for n, c in zip(acc["solver_samples"] + rej["solver_samples"],
                                     acc["solver_correct"] + rej["solver_correct"]) if n]
    rates = [c / n for n, c in counts]
    settings = st.get("settings") or {}
    k_max = settings.get("samples") or max((n for n, _ in counts), default=0)
    labels, hist = _histogram(rates, 10, 0, 1.0000001)
    return {"questions": len(counts), "kept": st["kept"], "band": settings.get("band"),
            "min_samples": settings.get("min_samples"), "samples": k_max,
            "mean_pass_rate": round(sum(rates) / len(rates), 4) if rates else None,
            "stopped_early": sum(n < k_max for n, _ in counts),
            "solver_requests": sum(n for n, _ in counts),
            "pass_rate_histogram": {"labels": labels, "counts": hist},
            "coverage": [round(v, 6) for v in coverage_curve(counts, k_max)]}


def generation_summary(summary: dict) -> dict:
    """Throughput and retries by cause from the generate manifest's summary. Pure.

    Two kinds of retry: a request retried by the engine (429, 5xx, timeout, reset, malformed
    body: `retries_<cause>` in the engine's counters) and a whole shard retried on a fresh
    replica (`replica_died`, `task_error`, `replica_start_failed`). Both are what a run paid for
    faults without losing records; a user sizing `max_retries` or a rate limit reads them here.
    Only the last `distill generate` invocation's counters are in the manifest (a resumed stage
    counts from its restart)."""
    engine = summary.get("engine") or {}
    return {
        "generated": summary.get("generated_this_run"),
        "samples_per_s": summary.get("samples_per_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "seconds": summary.get("seconds"),
        "request_retries": {k.removeprefix("retries_"): v for k, v in sorted(engine.items())
                            if k.startswith("retries_") and v},
        "shard_retries": {k: v for k, v in sorted((summary.get("shard_retries") or {}).items()) if v},
    }


# --------------------------------------------------------------------------- training, eval, config

MAX_POINTS = 1000
"""Most points per curve and columns per heat map in the page (longer runs are averaged into
bins): a 100k-step run must still give a page a browser opens at once."""


def read_config(run_dir: Path) -> dict | None:
    """The resolved config `distill run` saved (RUN/config.yaml), verbatim, with its sha256."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    raw = path.read_bytes()
    return {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "text": raw.decode("utf-8", "replace")}


def read_train(train_dir: Path) -> dict:
    """Training records: metrics lines, per-rank step times, stragglers and goodput (None each
    when the file is absent)."""
    train_dir = Path(train_dir)
    metrics = train_dir / "metrics.jsonl"
    ranks = sorted((train_dir / "step_times").glob("rank-*.jsonl")) if (train_dir / "step_times").is_dir() else []
    stragglers = train_dir / "stragglers.jsonl"
    goodput = train_dir / "goodput.json"
    return {
        "metrics": read_jsonl(metrics, skip_invalid=True) if metrics.is_file() else None,
        "step_times": [r for p in ranks for r in read_jsonl(p, skip_invalid=True)] if ranks else None,
        "stragglers": read_jsonl(stragglers, skip_invalid=True) if stragglers.is_file() else None,
        "goodput": json.loads(goodput.read_text()) if goodput.is_file() else None,
    }


def read_eval(eval_dir: Path) -> dict | None:
    path = Path(eval_dir) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _bin_mean(points: list[tuple[float, float]], max_points: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most `max_points` points: consecutive points averaged in equal-count bins."""
    if len(points) <= max_points:
        return points
    size = math.ceil(len(points) / max_points)
    return [(statistics.fmean(p[0] for p in chunk), statistics.fmean(p[1] for p in chunk))
            for chunk in (points[i : i + size] for i in range(0, len(points), size))]


def series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) of every row with a finite number under `key`, by step; a step logged twice
    (a resumed run) keeps its last line."""
    by_step = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            by_step[r["step"]] = float(v)
    return sorted(by_step.items())


def step_time_grid(records: list[dict], max_cols: int = MAX_POINTS) -> dict:
    """Per-rank step times as a grid: rows are ranks, columns steps (or bins of consecutive steps,
    averaged), values `step_s` (None where a rank has no record). A step run again after a restart
    keeps its last attempt."""
    last: dict[tuple[int, int], dict] = {}
    for r in records:
        key = (r["rank"], r["step"])
        if key not in last or r.get("attempt", 0) >= last[key].get("attempt", 0):
            last[key] = r
    ranks = sorted({k[0] for k in last})
    steps = sorted({k[1] for k in last})
    size = max(1, math.ceil(len(steps) / max_cols))
    cols = [steps[i : i + size] for i in range(0, len(steps), size)]
    nodes = {r: next((last[k].get("node") for k in last if k[0] == r), None) for r in ranks}
    values = []
    for rank in ranks:
        row = []
        for col in cols:
            vals = [last[(rank, s)]["step_s"] for s in col if (rank, s) in last]
            row.append(statistics.fmean(vals) if vals else None)
        values.append(row)
    return {"ranks": ranks, "nodes": nodes, "columns": [(c[0], c[-1]) for c in cols], "values": values}


def summarize_train(train: dict) -> dict:
    """What report.json keeps of the training records (curves binned, step times as a grid)."""
    out: dict = {}
    if train["metrics"] is not None:
        keys = sorted({k for r in train["metrics"] for k in r if k != "step"})
        out["curves"] = {k: _bin_mean(series(train["metrics"], k)) for k in keys}
        out["curves"] = {k: v for k, v in out["curves"].items() if v}
    if train["step_times"] is not None:
        out["step_time_grid"] = step_time_grid(train["step_times"])
        compute = [r.get("compute_s") for r in train["step_times"] if isinstance(r.get("compute_s"), (int, float))]
        comm = [r.get("comm_s") for r in train["step_times"] if isinstance(r.get("comm_s"), (int, float))]
        data = [r.get("data_s") for r in train["step_times"] if isinstance(r.get("data_s"), (int, float))]
        out["step_time_split_s"] = {"data": sum(data), "compute": sum(compute), "comm": sum(comm)}
    if train["stragglers"] is not None:
        out["stragglers"] = train["stragglers"]
    if train["goodput"] is not None:
        out["goodput"] = train["goodput"]
    return out


EVAL_ROLES = (("teacher", "teacher"), ("student_before", "student before"), ("student_after", "student after"))


def eval_rows(results: dict) -> list[dict]:
    """One row per (benchmark, metric): the three models' values and after - before. Pure."""
    models = results.get("models", {})
    bench_names = list(results.get("benchmarks") or {})
    for m in models.values():
        bench_names += [b for b in m.get("benchmarks", {}) if b not in bench_names]
    rows = []
    for bench in bench_names:
        metrics: list[tuple[str, str, str | None]] = [("greedy", "greedy_acc", None)]
        ks: set[str] = set()
        for m in models.values():
            b = m.get("benchmarks", {}).get(bench, {})
            ks |= set(b.get("pass@k", {})) | set(b.get("maj@k", {}))
        for k in sorted(ks, key=int):
            metrics += [(f"pass@{k}", "pass@k", k), (f"maj@{k}", "maj@k", k)]
        for label, key, k in metrics:
            row = {"benchmark": bench, "metric": label, "n": None, "values": {}, "same_as": {}}
            for role, _ in EVAL_ROLES:
                m = models.get(role)
                b = (m or {}).get("benchmarks", {}).get(bench)
                if b is None:
                    continue
                v = b.get(key) if k is None else b.get(key, {}).get(k)
                row["values"][role] = v
                row["n"] = b.get("n_questions", row["n"])
                if m.get("same_as"):
                    row["same_as"][role] = m["same_as"]
            if not any(v is not None for v in row["values"].values()):
                continue
            before, after = row["values"].get("student_before"), row["values"].get("student_after")
            row["delta"] = after - before if before is not None and after is not None else None
            rows.append(row)
    return rows


def yield_by(run_dir: Path, stages: list[str], column: str) -> dict[str, dict[str, int]]:
    """{value of `column`: {stage: rows kept}} over `stages` (which keep the column): where each
    imported set's (`origin`) or synthesis method's (`method`) rows go. One column per shard read."""
    out: dict[str, dict[str, int]] = {}
    for s in stages:
        for value, n in Counter(_columns(run_dir / s, [column])[column]).items():
            if value is not None:
                out.setdefault(value, {})[s] = n
    return out


def flag_agreement(origins: list, flags: list, verdicts: list) -> dict[str, dict]:
    """Per imported set: how its own correctness flags compare with distill's verifier. Samples
    without a flag (or without a verdict) are counted apart, never as agreement. Pure."""
    out: dict[str, Counter] = {}
    for origin, flag, ok in zip(origins, flags, verdicts):
        if origin is None:
            continue
        c = out.setdefault(origin, Counter())
        c["samples"] += 1
        if flag is None or ok is None:
            c["unflagged"] += 1
        elif flag == ok:
            c["agree"] += 1
        else:
            c["set_says_right_verifier_wrong" if flag else "set_says_wrong_verifier_right"] += 1
    result = {}
    for origin, c in sorted(out.items()):
        flagged = c["samples"] - c["unflagged"]
        result[origin] = {"samples": c["samples"], "flagged": flagged, "agree": c["agree"],
                          "agreement": round(c["agree"] / flagged, 4) if flagged else None,
                          "set_says_right_verifier_wrong": c["set_says_right_verifier_wrong"],
                          "set_says_wrong_verifier_right": c["set_says_wrong_verifier_right"]}
    return result


def format_table(report: dict) -> str:
    """The funnel as a text table, or, for a run without curation output (a `distill train` or
    `distill eval` run dir), one line saying so followed by what the run does have."""
    if not report["funnel"]:
        return "\n".join(["no curation output in this run (no RUN/<stage>/_manifest.json)", *_summary_lines(report)])
    return "\n".join([_funnel_text(report), *_summary_lines(report)])


def _summary_lines(report: dict) -> list[str]:
    out = []
    g = report.get("generation")
    if g and (g["request_retries"] or g["shard_retries"]):
        out.append("generation retries: requests " + (", ".join(f"{k}={v}" for k, v in g["request_retries"].items()) or "-")
                   + "; shards " + (", ".join(f"{k}={v}" for k, v in g["shard_retries"].items()) or "-"))
    for origin, kept in (report.get("imported_yield") or {}).items():
        out.append(f"import {origin}: " + " -> ".join(f"{s} {n}" for s, n in kept.items()))
    for method, kept in (report.get("synthesized_yield") or {}).items():
        out.append(f"synthesize {method}: " + " -> ".join(f"{s} {n}" for s, n in kept.items()))
    for origin, f in (report.get("imported_flags") or {}).items():
        if not f["flagged"]:
            out.append(f"import {origin}: the set carries no correctness flags to compare with the verifier")
            continue
        agreement = f"{f['agreement']:.1%}" if f["agreement"] is not None else "-"
        out.append(f"import {origin}: its flags agree with the verifier on {agreement} of {f['flagged']} flagged "
                   f"samples (set right / verifier wrong: {f['set_says_right_verifier_wrong']}, set wrong / "
                   f"verifier right: {f['set_says_wrong_verifier_right']}; {f['samples'] - f['flagged']} unflagged)")
    d = report.get("difficulty")
    if d and d["questions"]:
        cov = d["coverage"]
        out.append(f"difficulty: {d['questions']} questions, solver pass rate {d['mean_pass_rate']:.1%} on average, "
                   f"coverage pass@1 {cov[0]:.1%} -> pass@{len(cov)} {cov[-1]:.1%}; {d['kept']} kept in band "
                   f"{d['band']}; {d['stopped_early']} stopped after {d['min_samples']} samples "
                   f"({d['solver_requests']} solver requests)")
    train = report.get("train") or {}
    loss = (train.get("curves") or {}).get("loss")
    if loss:
        out.append(f"train: {len(loss)} logged points, loss {loss[0][1]:.4g} at step {loss[0][0]:g} -> "
                   f"{loss[-1][1]:.4g} at step {loss[-1][0]:g}")
    gp = train.get("goodput")
    if gp:
        out.append(f"goodput: {gp.get('goodput', 0):.1%} ({gp.get('restarts', 0)} restart(s), "
                   f"{gp.get('lost_s', 0):.4g} s lost to failures)")
    for r in eval_rows(report["eval"]) if report.get("eval") else []:
        if r["metric"] != "greedy":
            continue
        vals = ", ".join(f"{role} {r['values'][role]:.1%}" for role, _ in EVAL_ROLES
                         if r["values"].get(role) is not None)
        out.append(f"eval {r['benchmark']} greedy: {vals}")
    return out


def _funnel_text(report: dict) -> str:
    rows = [("stage", "in", "kept", "rejected", "yield", "questions", "tokens kept", "top reasons")]
    for f in report["funnel"]:
        reasons = ", ".join(f"{k}={v}" for k, v in list(f["reasons"].items())[:4]) or "-"
        y = f"{f['yield']:.1%}" if f["yield"] is not None else "-"
        rows.append((f["stage"], str(f["input"]), str(f["kept"]), str(f["rejected"]), y, str(f["questions"]),
                     str(f["tokens"]), reasons))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# --------------------------------------------------------------------------- HTML / SVG


def _svg_bars(title: str, labels: list[str], series: dict[str, list[float]], width: int = 640, *,
              plot_id: str) -> str:
    """Grouped horizontal bars, one row per label, one colour per series."""
    colours = ["#3b7dd8", "#d8653b", "#4caf50", "#9c27b0"]
    row_h, bar_h, left = 22, 16 / max(1, len(series)), 190
    height = 40 + row_h * max(1, len(labels)) + 20
    top = max([v for vals in series.values() for v in vals] or [1]) or 1
    parts = [f'<svg id="{plot_id}" class="plot" role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
             f'xmlns="http://www.w3.org/2000/svg"><text x="4" y="16" font-weight="bold">{html.escape(title)}</text>']
    for k, name in enumerate(series):
        parts.append(f'<rect x="{left + 120 * k}" y="24" width="10" height="10" fill="{colours[k % 4]}"/>'
                     f'<text x="{left + 14 + 120 * k}" y="33" font-size="11">{html.escape(name)}</text>')
    for i, label in enumerate(labels):
        y = 40 + i * row_h
        parts.append(f'<text x="4" y="{y + 13}" font-size="12">{html.escape(label[:28])}</text>')
        for k, vals in enumerate(series.values()):
            w = (width - left - 60) * vals[i] / top
            parts.append(f'<rect x="{left}" y="{y + k * bar_h}" width="{w:.1f}" height="{bar_h - 1:.1f}" '
                         f'fill="{colours[k % 4]}"><title>{html.escape(label)}: {vals[i]:g}</title></rect>'
                         f'<text x="{left + w + 4:.1f}" y="{y + k * bar_h + bar_h - 3:.1f}" font-size="10">{vals[i]:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram(values: list[float], bins: int, lo: float, hi: float) -> tuple[list[str], list[int]]:
    counts = [0] * bins
    step = (hi - lo) / bins or 1
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / step)))] += 1
    labels = [f"{lo + i * step:.3g}-{lo + (i + 1) * step:.3g}" for i in range(bins)]
    return labels, counts


_COLOURS = ["#3b7dd8", "#d8653b", "#4caf50", "#9c27b0", "#795548", "#607d8b"]


def _esc(x) -> str:
    return html.escape(str(x))


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _svg_lines(plot_id: str, title: str, curves: dict[str, list[tuple[float, float]]], *, xlabel: str,
               ylabel: str, width: int = 640, height: int = 260, zero_based: bool = False) -> str:
    """Line chart, one polyline per curve, linear axes with five ticks each."""
    left, right, top, bottom = 76, 16, 44, 40
    pts = [p for c in curves.values() for p in c]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = (0.0 if zero_based else min(p[1] for p in pts)), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-9, y1 + abs(y1) * 0.1 + 1e-9
    pad = (y1 - y0) * 0.05
    y0, y1 = (y0 if zero_based else y0 - pad), y1 + pad
    w, h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return top + h - (y - y0) / (y1 - y0) * h

    parts = [f'<svg id="{plot_id}" class="plot" role="img" aria-label="{_esc(title)}" width="{width}" '
             f'height="{height}" xmlns="http://www.w3.org/2000/svg">'
             f'<text x="4" y="16" font-weight="bold">{_esc(title)}</text>'
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(f'<line x1="{sx(xv):.1f}" y1="{top + h}" x2="{sx(xv):.1f}" y2="{top + h + 4}" stroke="#999"/>'
                     f'<text x="{sx(xv):.1f}" y="{top + h + 16}" font-size="10" text-anchor="middle">{xv:.4g}</text>'
                     f'<line x1="{left - 4}" y1="{sy(yv):.1f}" x2="{left + w}" y2="{sy(yv):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(yv) + 3:.1f}" font-size="10" text-anchor="end">{yv:.3g}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{_esc(xlabel)}</text>'
                 f'<text x="12" y="{top + h / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + h / 2})">{_esc(ylabel)}</text>')
    for k, (name, c) in enumerate(curves.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        parts.append(f'<rect x="{left + 170 * k}" y="24" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + 14 + 170 * k}" y="33" font-size="11">{_esc(name)}</text>')
        if len(c) == 1:
            parts.append(f'<circle cx="{sx(c[0][0]):.1f}" cy="{sy(c[0][1]):.1f}" r="3" fill="{colour}"/>')
        else:
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in c)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{d}">'
                         f'<title>{_esc(name)}: last {_fmt(c[-1][1])} at {xlabel} {_fmt(c[-1][0])}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def _heat_colour(t: float) -> str:
    """Light yellow (fast) to dark red (slow) for t in [0, 1]."""
    lo, hi = (255, 247, 188), (189, 0, 38)
    return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(lo, hi))


def _svg_heatmap(plot_id: str, title: str, grid: dict, width: int = 900) -> str:
    """Ranks x steps, colour = step time (seconds), with a min..max legend."""
    left, top, cell_h = 150, 52, 16
    vals = [v for row in grid["values"] for v in row if v is not None]
    vmin, vmax = min(vals), max(vals)
    span = (vmax - vmin) or 1.0
    n_cols = max(1, len(grid["columns"]))
    cw = (width - left - 20) / n_cols
    height = top + cell_h * len(grid["ranks"]) + 30
    parts = [f'<svg id="{plot_id}" class="plot" role="img" aria-label="{_esc(title)}" width="{width}" '
             f'height="{height}" xmlns="http://www.w3.org/2000/svg">'
             f'<text x="4" y="16" font-weight="bold">{_esc(title)}</text>'
             f'<defs><linearGradient id="{plot_id}-grad"><stop offset="0" stop-color="{_heat_colour(0)}"/>'
             f'<stop offset="1" stop-color="{_heat_colour(1)}"/></linearGradient></defs>'
             f'<text x="4" y="38" font-size="11">{vmin:.3g} s</text>'
             f'<rect x="60" y="28" width="160" height="12" fill="url(#{plot_id}-grad)"/>'
             f'<text x="226" y="38" font-size="11">{vmax:.3g} s per step (darker = slower)</text>']
    for i, rank in enumerate(grid["ranks"]):
        y = top + i * cell_h
        node = grid["nodes"].get(rank) if isinstance(grid["nodes"], dict) else None
        label = f"rank {rank}" + (f" ({node})" if node else "")
        parts.append(f'<text x="4" y="{y + 12}" font-size="11">{_esc(label[:24])}</text>')
        for j, v in enumerate(grid["values"][i]):
            a, b = grid["columns"][j]
            colour = "#eeeeee" if v is None else _heat_colour((v - vmin) / span)
            steps = f"step {a}" if a == b else f"steps {a}-{b}"
            tip = f"rank {rank}, {steps}: " + ("no record" if v is None else f"{v:.4g} s")
            parts.append(f'<rect x="{left + j * cw:.2f}" y="{y}" width="{max(cw, 0.5):.2f}" height="{cell_h - 1}" '
                         f'fill="{colour}"><title>{_esc(tip)}</title></rect>')
    a, b = grid["columns"][0][0], grid["columns"][-1][1]
    y = top + cell_h * len(grid["ranks"]) + 14
    parts.append(f'<text x="{left}" y="{y}" font-size="10">step {a}</text>'
                 f'<text x="{width - 20}" y="{y}" font-size="10" text-anchor="end">step {b}</text></svg>')
    return "".join(parts)


def _svg_goodput(plot_id: str, g: dict, width: int = 640) -> str:
    """One bar of the run's wall time: productive steps, time lost to failures, other overhead."""
    wall = g["wall_s"] or 1e-9
    productive, lost = min(g["productive_s"], wall), min(g["lost_s"], wall)
    other = max(0.0, wall - productive - lost)
    left, w = 10, width - 20
    parts = [f'<svg id="{plot_id}" class="plot" role="img" aria-label="goodput" width="{width}" height="86" '
             f'xmlns="http://www.w3.org/2000/svg"><text x="4" y="16" font-weight="bold">'
             f'Goodput {g["goodput"]:.1%}: productive step time / wall time ({wall:.4g} s)</text>']
    x = left
    for k, (name, v, colour) in enumerate((("productive", productive, "#4caf50"), ("lost to failures", lost, "#d8653b"),
                                           ("other (start-up, checkpoints, eval)", other, "#bbbbbb"))):
        bw = w * v / wall
        parts.append(f'<rect x="{x:.1f}" y="26" width="{bw:.1f}" height="22" fill="{colour}">'
                     f'<title>{_esc(name)}: {v:.4g} s</title></rect>'
                     f'<rect x="{left + 210 * k}" y="60" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + 14 + 210 * k}" y="69" font-size="11">{_esc(name)} {v:.4g} s</text>')
        x += bw
    parts.append("</svg>")
    return "".join(parts)


def _table(head: list[str], rows: list[list], table_id: str | None = None) -> str:
    tid = f' id="{table_id}"' if table_id else ""
    return (f"<table{tid}><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _missing(what: str) -> str:
    return f'<p class="missing">not recorded ({_esc(what)} is absent)</p>'


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _section(sec_id: str, title: str, body: str) -> str:
    return f'<section id="{sec_id}"><h2>{_esc(title)}</h2>{body}</section>'


def _funnel_sections(report: dict) -> list[str]:
    funnel = report["funnel"]
    if not funnel:
        return [_section("sec-funnel", "Data funnel", _missing("curation output (RUN/<stage>/_manifest.json)"))]
    out = []
    head = ["stage", "in", "kept", "rejected", "yield", "questions", "tokens kept", "reasons"]
    rows = [[_esc(c) for c in (f["stage"], f["input"], f["kept"], f["rejected"],
                               f"{f['yield']:.1%}" if f["yield"] is not None else "-", f["questions"], f["tokens"],
                               ", ".join(f"{k}={v}" for k, v in f["reasons"].items()) or "-")] for f in funnel]
    body = _table(head, rows, "funnel-table")
    body += _svg_bars("Records kept and rejected per stage", [f["stage"] for f in funnel],
                      {"kept": [f["kept"] for f in funnel], "rejected": [f["rejected"] for f in funnel]},
                      plot_id="plot-funnel")
    reasons = Counter()
    for f in funnel:
        for k, v in f["reasons"].items():
            reasons[f"{f['stage']}: {k}"] += v
    if reasons:
        items = reasons.most_common()
        body += _svg_bars("Rejections by reason", [k for k, _ in items], {"rejected": [v for _, v in items]},
                          plot_id="plot-reasons")
    out.append(_section("sec-funnel", "Data funnel", body))
    lengths = report["lengths"]
    if lengths["kept"] or lengths["rejected"]:
        hi = max(lengths["kept"] + lengths["rejected"]) + 1
        labels, kept = _histogram(lengths["kept"], 10, 0, hi)
        _, rej = _histogram(lengths["rejected"], 10, 0, hi)
        body = _svg_bars("Completion length (tokens): kept vs rejected", labels, {"kept": kept, "rejected": rej},
                         plot_id="plot-lengths")
    else:
        body = _missing("n_tokens of generated samples")
    out.append(_section("sec-lengths", "Completion lengths", body))
    if report.get("pass_rate_per_question"):
        labels, counts = _histogram(report["pass_rate_per_question"], 10, 0, 1.0000001)
        body = _svg_bars("Pass rate per question", labels, {"questions": counts}, plot_id="plot-passrate")
    else:
        body = _missing("RUN/verify")
    out.append(_section("sec-passrate", "Teacher pass rate per question", body))
    if report.get("difficulty"):
        out.append(_section("sec-difficulty", "Solver difficulty", _difficulty_body(report["difficulty"])))
    if report.get("decontam"):
        hits = report["decontam"]["questions_removed_by_benchmark"]
        body = _svg_bars("Decontamination: questions removed per benchmark", list(hits) or ["(none)"],
                         {"questions": list(hits.values()) or [0]}, plot_id="plot-decontam")
        methods = report["decontam"]["samples_removed_by_method"]
        body += "<p>Samples removed by method: " + (_esc(", ".join(f"{k}={v}" for k, v in methods.items())) or "none") + "</p>"
    else:
        body = _missing("RUN/decontam")
    out.append(_section("sec-decontam", "Decontamination hits per benchmark", body))
    return out


def _difficulty_body(d: dict) -> str:
    if not d["questions"]:
        return _missing("solver samples in RUN/difficulty")
    h = d["pass_rate_histogram"]
    body = _svg_bars("Solver pass rate per question (kept and rejected)", h["labels"], {"questions": h["counts"]},
                     plot_id="plot-difficulty")
    body += _svg_lines("plot-coverage", "Coverage: mean pass@k over questions",
                       {"pass@k": [(k + 1, v) for k, v in enumerate(d["coverage"])]},
                       xlabel="k (samples)", ylabel="pass@k", zero_based=True)
    body += (f"<p>{_esc(d['kept'])} of {_esc(d['questions'])} questions kept in band {_esc(d['band'])}; "
             f"{_esc(d['stopped_early'])} stopped after {_esc(d['min_samples'])} unanimous samples; "
             f"{_esc(d['solver_requests'])} solver requests. A question stopped early counts as solved or "
             "unsolved at every k.</p>")
    return body


def _generation_section(g: dict | None) -> str:
    if g is None:
        return _section("sec-generation", "Generation", _missing("RUN/generate/_manifest.json"))
    facts = [("samples generated (last invocation)", g["generated"]), ("samples / s", g["samples_per_s"]),
             ("tokens / s", g["tokens_per_s"]), ("seconds", g["seconds"])]
    body = _table(["", "value"], [[_esc(k), _esc(_fmt(v) if v is not None else "-")] for k, v in facts],
                  "generation-table")
    retries = {**{f"request: {k}": v for k, v in g["request_retries"].items()},
               **{f"shard: {k}": v for k, v in g["shard_retries"].items()}}
    if retries:
        body += _svg_bars("Retries by cause", list(retries), {"retries": list(retries.values())},
                          plot_id="plot-retries")
    else:
        body += "<p>No request or shard was retried.</p>"
    return _section("sec-generation", "Generation", body)


def _imported_section(flags: dict | None) -> str:
    if not flags:
        return _section("sec-imported", "Imported sets: their flags vs the verifier", _missing("RUN/import"))
    head = ["set", "samples", "flagged", "agreement", "set right, verifier wrong", "set wrong, verifier right"]
    rows = [[_esc(o), f["samples"], f["flagged"], _pct(f["agreement"]), f["set_says_right_verifier_wrong"],
             f["set_says_wrong_verifier_right"]] for o, f in flags.items()]
    return _section("sec-imported", "Imported sets: their flags vs the verifier", _table(head, rows, "imported-table"))


def _yield_section(sec_id: str, title: str, yields: dict[str, dict[str, int]]) -> str:
    stages = list(dict.fromkeys(s for kept in yields.values() for s in kept))
    rows = [[_esc(k), *(kept.get(s, 0) for s in stages)] for k, kept in yields.items()]
    return _section(sec_id, title, _table(["", *stages], rows, f"{sec_id}-table"))


def _train_sections(train: dict) -> list[str]:
    out = []
    curves = train.get("curves")
    if curves is None:
        out.append(_section("sec-loss", "Training loss and throughput", _missing("RUN/train/metrics.jsonl")))
    else:
        body = ""
        charts = (("plot-loss", "Training loss", ["loss"], "loss", False),
                  ("plot-throughput", "Throughput", ["tokens_per_s", "target_tokens_per_s"], "tokens / s", True),
                  ("plot-step-s", "Step time", ["step_s"], "seconds", True),
                  ("plot-lr", "Learning rate", ["lr"], "lr", True),
                  ("plot-grad-norm", "Gradient norm", ["grad_norm"], "norm", True),
                  ("plot-mfu", "Model FLOP utilisation", ["mfu"], "MFU", True))
        for plot_id, title, keys, ylabel, zero in charts:
            present = {k: curves[k] for k in keys if curves.get(k)}
            if present:
                body += _svg_lines(plot_id, title, present, xlabel="step", ylabel=ylabel, zero_based=zero)
            elif plot_id in ("plot-loss", "plot-throughput"):
                body += _missing(f"{', '.join(keys)} in RUN/train/metrics.jsonl")
        out.append(_section("sec-loss", "Training loss and throughput", body))
    grid = train.get("step_time_grid")
    if grid and grid["ranks"]:
        split = train.get("step_time_split_s", {})
        total = sum(split.values()) or 1.0
        body = _svg_heatmap("plot-steptime-heatmap", "Step time per rank", grid)
        body += "<p>Time split over all ranks and steps: " + _esc(", ".join(
            f"{k} {v:.4g} s ({v / total:.0%})" for k, v in split.items())) + "</p>"
    else:
        body = _missing("RUN/train/step_times/rank-*.jsonl")
    out.append(_section("sec-steptimes", "Per-rank step time", body))
    if train.get("stragglers") is None:
        body = _missing("RUN/train/stragglers.jsonl")
    elif not train["stragglers"]:
        body = "<p>No straggler was flagged.</p>"
    else:
        keys = ["step", "rank", "node", "ratio", "windows", "policy", "action"]
        body = _table(keys, [[_esc(_fmt(s.get(k, "-"))) for k in keys] for s in train["stragglers"]], "stragglers-table")
    out.append(_section("sec-stragglers", "Stragglers", body))
    g = train.get("goodput")
    if g is None:
        body = _missing("RUN/train/goodput.json")
    else:
        body = _svg_goodput("plot-goodput", g)
        body += f"<p>{g['restarts']} restart(s); {g['lost_s']:.4g} s lost to failures.</p>"
        if g.get("failures"):
            keys = ["attempt", "cause", "failed_at_step", "resumed_from_step", "lost_s", "recover_s"]
            body += _table(keys, [[_esc(_fmt(f.get(k, "-"))) for k in keys] for f in g["failures"]], "failures-table")
    out.append(_section("sec-goodput", "Goodput", body))
    return out


def _eval_section(results: dict | None) -> str:
    if results is None:
        return _section("sec-eval", "Evaluation", _missing("RUN/eval/results.json"))
    rows = eval_rows(results)
    models = results.get("models", {})
    names = [f"{label}: {_esc(models[role]['engine'])}:{_esc(models[role]['model'])}"
             for role, label in EVAL_ROLES if role in models]
    head = ["benchmark", "metric", "questions"] + [label for _, label in EVAL_ROLES] + ["Δ after − before"]
    table_rows = []
    for r in rows:
        cells = [_esc(r["benchmark"]), _esc(r["metric"]), _esc(r["n"] if r["n"] is not None else "-")]
        for role, _ in EVAL_ROLES:
            v = r["values"].get(role)
            note = f' <span class="note">(= {_esc(r["same_as"][role].replace("_", " "))})</span>' if role in r["same_as"] else ""
            cells.append(("not evaluated" if role not in r["values"] else _pct(v)) + note)
        d = r.get("delta")
        cells.append("-" if d is None else f'<span class="{"up" if d > 0 else "down" if d < 0 else ""}">{d:+.1%}</span>')
        table_rows.append(cells)
    body = "<p>Models: " + "; ".join(names) + ".</p>" + _table(head, table_rows, "eval-table")
    greedy = [r for r in rows if r["metric"] == "greedy"]
    if greedy:
        present = [(role, label) for role, label in EVAL_ROLES if any(role in r["values"] for r in greedy)]
        body += _svg_bars("Greedy accuracy per benchmark", [r["benchmark"] for r in greedy],
                          {label: [r["values"].get(role) or 0.0 for r in greedy] for role, label in present},
                          plot_id="plot-eval")
    n_small = [r for r in greedy if r["n"] is not None and r["n"] < 100]
    if n_small:
        body += ("<p class=\"note\">Fewer than 100 questions per benchmark: one question moves a score by "
                 f"{1 / min(r['n'] for r in n_small):.1%}; differences this small are noise.</p>")
    return _section("sec-eval", "Evaluation: teacher / student before / student after", body)


def _provenance_section(report: dict) -> str:
    cfg = report.get("config")
    body = "<h3>Config</h3>"
    if cfg is None:
        body += _missing("RUN/config.yaml")
    else:
        body += (f"<p><code>{_esc(cfg['path'])}</code> sha256 <code>{cfg['sha256']}</code></p>"
                 f"<details open><summary>resolved config</summary><pre id=\"config-text\">{_esc(cfg['text'])}</pre></details>")
    rows = []
    for name, v in (report.get("decontam") or {}).get("benchmarks", {}).items():
        for f, h in v.get("sha256", {}).items():
            rows.append(["decontam", _esc(name), f"<code>{_esc(f)}</code>", f"<code>{_esc(h)}</code>"])
    for name, v in ((report.get("eval") or {}).get("benchmarks") or {}).items():
        for f, h in (v.get("files") or {name: v.get("sha256")}).items():
            rows.append(["eval", _esc(name), f"<code>{_esc(f)}</code>", f"<code>{_esc(h)}</code>"])
    body += "<h3>Benchmarks</h3>" + (_table(["used by", "benchmark", "file", "sha256"], rows, "benchmark-hashes")
                                      if rows else _missing("benchmark provenance (decontam manifest, eval results)"))
    return _section("sec-config", "Exact config and benchmark hashes", body)


_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1000px;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left}th{background:#f3f3f3}svg.plot{display:block;margin:1.2em 0}
section{border-top:1px solid #ddd;margin-top:1.5em}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:12px;
max-height:40em}.missing{color:#888;font-style:italic}.note{color:#666;font-size:12px}.up{color:#2e7d32}
.down{color:#c62828}nav a{margin-right:1em;font-size:13px}"""


def render_html(report: dict) -> str:
    sections = _funnel_sections(report)
    sections.insert(1, _generation_section(report.get("generation")))
    if report.get("imported_flags") is not None:
        sections.insert(2, _imported_section(report["imported_flags"]))
    if report.get("synthesized_yield"):
        sections.insert(2, _yield_section("sec-synthesized", "Synthesized questions kept, by method",
                                          report["synthesized_yield"]))
    sections += _train_sections(report.get("train") or {})
    sections.append(_eval_section(report.get("eval")))
    sections.append(_provenance_section(report))
    nav = "".join(f'<a href="#{sid}">{_esc(t)}</a>' for sid, t in (
        ("sec-funnel", "funnel"), ("sec-generation", "generation"), ("sec-lengths", "lengths"), ("sec-passrate", "pass rate"),
        *((("sec-difficulty", "difficulty"),) if report.get("difficulty") else ()),
        ("sec-decontam", "decontamination"), ("sec-loss", "training"), ("sec-steptimes", "step times"),
        ("sec-stragglers", "stragglers"), ("sec-goodput", "goodput"), ("sec-eval", "evaluation"),
        ("sec-config", "config")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>distill report: {_esc(report['run_dir'])}</title>
<style>{_CSS}</style>
</head><body><h1>distill run report</h1><p><code>{_esc(report['run_dir'])}</code></p><nav>{nav}</nav>
{''.join(sections)}
</body></html>
"""


def write_report(run_dir: Path) -> tuple[dict, Path, Path]:
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    json_path, html_path = run_dir / "report.json", run_dir / "report.html"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    html_path.write_text(render_html(report))
    return report, json_path, html_path
