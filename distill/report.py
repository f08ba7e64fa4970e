"""`distill report RUN_DIR`: the data funnel of a run, from the records on disk.

Every number comes from the stored shards (accepted and `rejected/`), never from counters kept
while the stages ran, so the report is right after crashes, resumes and partial reruns. Writes
`report.json` (machine-readable) and `report.html` (one self-contained page, inline SVG plots, no
scripts) into the run directory and prints the funnel table.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from distill.store import MANIFEST, REJECTED, Manifest, reason_code

FUNNEL = ("source", "generate", "verify", "filter", "dedup", "decontam", "sft")
"""Stage directories in pipeline order; the report covers those present in the run."""


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
    stages = [s for s in FUNNEL if (run_dir / s / MANIFEST).exists()]
    if not stages:
        raise FileNotFoundError(f"{run_dir} holds no stage output (no */{MANIFEST}); is it a run directory?")
    report: dict = {"run_dir": str(run_dir.resolve()), "stages": {}, "funnel": []}
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

    if "verify" in stages:
        v = _columns(run_dir / "verify", ["id", "pass_rate", "verdict"])
        per_q = dict(zip(v["id"], v["pass_rate"]))
        report["pass_rate_per_question"] = [p for p in per_q.values() if p is not None]
        report["verdicts"] = dict(Counter(v["verdict"]).most_common())
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


def format_table(report: dict) -> str:
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


def _svg_bars(title: str, labels: list[str], series: dict[str, list[float]], width: int = 640) -> str:
    """Grouped horizontal bars, one row per label, one colour per series."""
    colours = ["#3b7dd8", "#d8653b", "#4caf50", "#9c27b0"]
    row_h, bar_h, left = 22, 16 / max(1, len(series)), 190
    height = 40 + row_h * max(1, len(labels)) + 20
    top = max([v for vals in series.values() for v in vals] or [1]) or 1
    parts = [f'<svg class="plot" role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
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


def render_html(report: dict) -> str:
    sections = []
    funnel = report["funnel"]
    sections.append(_svg_bars("Records kept and rejected per stage", [f["stage"] for f in funnel],
                              {"kept": [f["kept"] for f in funnel], "rejected": [f["rejected"] for f in funnel]}))
    reasons = Counter()
    for f in funnel:
        for k, v in f["reasons"].items():
            reasons[f"{f['stage']}: {k}"] += v
    if reasons:
        items = reasons.most_common()
        sections.append(_svg_bars("Rejections by reason", [k for k, _ in items], {"rejected": [v for _, v in items]}))
    lengths = report["lengths"]
    if lengths["kept"] or lengths["rejected"]:
        hi = max(lengths["kept"] + lengths["rejected"]) + 1
        labels, kept = _histogram(lengths["kept"], 10, 0, hi)
        _, rej = _histogram(lengths["rejected"], 10, 0, hi)
        sections.append(_svg_bars("Completion length (tokens): kept vs rejected", labels, {"kept": kept, "rejected": rej}))
    if report.get("pass_rate_per_question"):
        labels, counts = _histogram(report["pass_rate_per_question"], 10, 0, 1.0000001)
        sections.append(_svg_bars("Pass rate per question", labels, {"questions": counts}))
    if report.get("decontam"):
        hits = report["decontam"]["questions_removed_by_benchmark"]
        sections.append(_svg_bars("Decontamination: questions removed per benchmark", list(hits) or ["(none)"],
                                  {"questions": list(hits.values()) or [0]}))
    head = "".join(f"<th>{h}</th>" for h in ("stage", "in", "kept", "rejected", "yield", "questions", "tokens kept", "reasons"))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            f["stage"], f["input"], f["kept"], f["rejected"],
            f"{f['yield']:.1%}" if f["yield"] is not None else "-", f["questions"], f["tokens"],
            ", ".join(f"{k}={v}" for k, v in f["reasons"].items()) or "-")) + "</tr>" for f in funnel)
    bench = report.get("decontam", {}).get("benchmarks", {})
    bench_rows = "".join(f"<tr><td>{html.escape(n)}</td><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
                         for n, v in bench.items())
    bench_table = (f"<h2>Benchmarks checked</h2><table><tr><th>benchmark</th><th>files and sha256</th></tr>"
                   f"{bench_rows}</table>") if bench_rows else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>distill report: {html.escape(report['run_dir'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}svg.plot{{display:block;margin:1.5em 0}}</style>
</head><body><h1>distill run report</h1><p>{html.escape(report['run_dir'])}</p>
<h2>Data funnel</h2><table><tr>{head}</tr>{body}</table>
{''.join(sections)}{bench_table}
</body></html>
"""


def write_report(run_dir: Path) -> tuple[dict, Path, Path]:
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    json_path, html_path = run_dir / "report.json", run_dir / "report.html"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    html_path.write_text(render_html(report))
    return report, json_path, html_path
