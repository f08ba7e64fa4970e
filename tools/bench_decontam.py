"""Decontamination quality and speed on the labelled test set of tools/contam_testset.py.

Three detectors, run side by side on the same rows in one process:

    (a) distill     BenchmarkIndex: exact + n-gram share + short-text check (curate.decontam)
    (b) +embedding  (a), then the EmbeddingIndex (all-MiniLM-L6-v2) on the rows (a) did not flag
    (c) baseline    what one writes by hand: a Python set of word 8-grams (lower case,
                    punctuation stripped, whitespace split), flag on ANY shared 8-gram

Prints recall per contamination kind, false-positive rate per clean source, rows/s of (a), (b)
and (c), and the GSM8K-train questions matched to a GSM8K-test item (with their reference
answers, to tell real duplicates from false positives), as markdown.

    python tools/bench_decontam.py                       # (a) and (c), ~15 s
    python tools/bench_decontam.py --embedding           # + (b): 4-9 min on 2 CPU cores, the model's time
    python tools/bench_decontam.py --clean-per-source 0  # every clean row (GSM8K train, SVAMP, ASDiv)
    python tools/bench_decontam.py --set policy=overlap  # the decision before policies: shared words alone

`--real` measures instead on real data, labelled by hand: the MATH-train problems matched to a
MATH-500 problem, each pair read and labelled copy / variant / different in
tools/data/decontam_pairs_labelled.jsonl (ids only; the texts are read from ../shared/data).
It prints, for the old decision (policy `overlap`, short_threshold 0.6: every match is
removed) and the policies `copies` and `variants` side by side: MATH-train problems removed,
precision for each policy's goal, recall on the labelled copies, and GSM8K-train questions
removed against GSM8K test (none of which is a copy: see the synthetic mode's list).

    python tools/bench_decontam.py --real                # ~30 s
    python tools/bench_decontam.py --real --show         # + every removed pair with its label
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contam_testset import CLEAN, DATA, INDEXED, KINDS, build_testset  # noqa: E402

from distill.curate.benchmarks import BenchmarkRef, load_benchmarks  # noqa: E402
from distill.curate.decontam import BenchmarkIndex, DecontamConfig, EmbeddingIndex, combine  # noqa: E402
from distill.fsio import read_jsonl  # noqa: E402

_PUNCT = str.maketrans({c: " " for c in string.punctuation})


class Baseline:
    """Any shared word 8-gram flags: the usual hand-written decontamination script."""

    def __init__(self, texts: list[str], n: int = 8):
        self.n = n
        self.grams = set()
        for t in texts:
            self.grams.update(self._grams(t))

    def _grams(self, text: str):
        w = text.lower().translate(_PUNCT).split()
        return {" ".join(w[i : i + self.n]) for i in range(len(w) - self.n + 1)}

    def check_many(self, texts: list[str]) -> list[bool]:
        return [any(g in self.grams for g in self._grams(t)) for t in texts]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def rates(rows: list[dict], flags: list[bool]) -> dict[str, tuple[int, int]]:
    """group -> (flagged, total); groups are the contamination kinds and the clean sources."""
    c: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r, f in zip(rows, flags):
        key = r["kind"] if r["label"] else r["source"]
        c[key][0] += bool(f)
        c[key][1] += 1
    return {k: (v[0], v[1]) for k, v in c.items()}


def pct(x: tuple[int, int]) -> str:
    return f"{100 * x[0] / x[1]:.1f}% ({x[0]}/{x[1]})" if x[1] else "-"


LABELLED = Path(__file__).resolve().parent / "data" / "decontam_pairs_labelled.jsonl"
# The decision before policies existed, for the side-by-side: every match removed, at the
# thresholds that were the defaults then.
OLD_DECISION = {"policy": "overlap", "short_threshold": 0.6}


def real_mode(overrides: dict, show: bool) -> None:
    """Old decision vs `copies` vs `variants` on MATH-train x MATH-500 (labelled) and GSM8K-train x GSM8K."""
    labelled = {(r["train_id"], r["bench_id"]): r for r in read_jsonl(LABELLED)}
    copies = {k for k, r in labelled.items() if r["label"] == "copy"}
    sets = {"math": (read_jsonl(DATA / "train" / "math_train.jsonl"), "math500"),
            "gsm8k": (read_jsonl(DATA / CLEAN["gsm8k_train"]), "gsm8k")}
    decisions = {"old (overlap)": {**overrides, **OLD_DECISION}, "copies": {**overrides, "policy": "copies"},
                 "variants": {**overrides, "policy": "variants"}}
    found: dict[str, dict[str, list]] = {}
    for name, over in decisions.items():
        found[name] = {}
        for key, (rows, bench_name) in sets.items():
            cfg = DecontamConfig(benchmarks=[BenchmarkRef(name=bench_name, path=str(DATA / "benchmarks" / f"{bench_name}.jsonl"))],
                                 **over)
            index = BenchmarkIndex(load_benchmarks(cfg.benchmarks), cfg)
            matches = index.check_many([r["problem"] for r in rows])
            found[name][key] = [(r, m) for r, m in zip(rows, matches) if m is not None and not m.candidate]

    def cell(name: str, what: str) -> str:
        pairs = [((r["id"], m.item_id), m) for r, m in found[name]["math"]]
        labels = Counter(labelled[k]["label"] if k in labelled else "unlabelled" for k, _ in pairs)
        n_lab = sum(v for k, v in labels.items() if k != "unlabelled")
        if what == "flagged":
            return f"{len(pairs)} ({100 * len(pairs) / len(sets['math'][0]):.2f}%)"
        if what == "labels":
            return " / ".join(str(labels[k]) for k in ("copy", "variant", "different", "unlabelled"))
        if what == "unsure":
            return str(sum(m.kind == "unsure" for _, m in pairs))
        if what == "p_copies":
            return f"{100 * labels['copy'] / n_lab:.1f}% ({labels['copy']}/{n_lab})" if n_lab else "-"
        if what == "p_variants":
            good = labels["copy"] + labels["variant"]
            return f"{100 * good / n_lab:.1f}% ({good}/{n_lab})" if n_lab else "-"
        if what == "recall":
            hit = sum(k in copies for k, _ in pairs)
            return f"{100 * hit / len(copies):.0f}% ({hit}/{len(copies)})"
        if what == "gsm8k":
            n = len(found[name]["gsm8k"])
            return f"{100 * n / len(sets['gsm8k'][0]):.2f}% ({n}/{len(sets['gsm8k'][0])})"
        raise KeyError(what)

    names = list(decisions)
    print(f"command: python tools/bench_decontam.py {' '.join(sys.argv[1:])}")
    print(f"labelled pairs: {LABELLED.relative_to(LABELLED.parent.parent.parent)} ({len(labelled)}: "
          f"{dict(Counter(r['label'] for r in labelled.values()))})\n")
    print("| MATH-train (7,500) x MATH-500 | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    rows_out = [("problems removed", "flagged"), ("of which labelled copy / variant / different / unlabelled", "labels"),
                ("of which unsure (judge band; removed without a judge)", "unsure"),
                ("precision for `copies` (removed that are copies)", "p_copies"),
                ("precision for `variants` (removed that are copies or variants)", "p_variants"),
                ("recall on the labelled copies", "recall"),
                ("GSM8K-train questions removed against GSM8K test", "gsm8k")]
    for label, what in rows_out:
        print(f"| {label} | " + " | ".join(cell(n, what) for n in names) + " |")
    if show:
        for name in names[1:]:
            print(f"\n### removed under {name}")
            for r, m in found[name]["math"]:
                lab = labelled.get((r["id"], m.item_id), {}).get("label", "unlabelled")
                print(f"- {r['id']} ~ {m.item_id} [{lab}] {m.method} {m.score:.2f}; {m.diff}")
            for r, m in found[name]["gsm8k"]:
                print(f"- {r['id']} ~ {m.item_id} [gsm8k] {m.method} {m.score:.2f}; {m.diff}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=400, help="contaminated rows per kind")
    ap.add_argument("--clean-per-source", type=int, default=1500,
                    help="clean rows per source; 0: all (10,688 rows; (b) then takes ~10 min on 2 busy cores)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--embedding", action="store_true",
                    help="also run (b): embeds the 6,039 benchmark problems once (3-6 min on 2 CPU cores)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="DecontamConfig override, e.g. --set ngram=8 --set embedding.threshold=0.9")
    ap.add_argument("--show", type=int, nargs="?", const=10, default=0,
                    help="print this many misses per kind and FPs per source (--real: every removed pair)")
    ap.add_argument("--real", action="store_true",
                    help="MATH-train x MATH-500 pairs labelled by hand: old decision vs policies copies / variants")
    args = ap.parse_args()

    overrides: dict = {}
    for kv in args.set:
        key, value = kv.split("=", 1)
        node = overrides
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    if args.real:
        real_mode(overrides, bool(args.show))
        return
    refs = [BenchmarkRef(name=n, path=str(DATA / "benchmarks" / f"{n}.jsonl")) for n in INDEXED]
    cfg = DecontamConfig(benchmarks=refs, **overrides)
    benchmarks = load_benchmarks(cfg.benchmarks)
    rows = build_testset(args.per_kind, args.clean_per_source or None, args.seed)
    texts = [r["text"] for r in rows]
    bench_texts = [t for b in benchmarks for _, t in b.items]

    index, t_build = timed(BenchmarkIndex, benchmarks, cfg)
    lex, t_lex = timed(index.check_many, texts)
    base, t_base_build = timed(Baseline, bench_texts)
    base_flags, t_base = timed(base.check_many, texts)
    results = {"(a) distill": [m is not None and not m.candidate for m in lex],
               "(c) baseline 8-gram any": base_flags}
    speed = {"(a) distill": (t_build, t_lex), "(c) baseline 8-gram any": (t_base_build, t_base)}
    if args.embedding:
        # A fresh cache directory: the first build is cold (embeds every benchmark problem), the
        # second is what every later run with the same model and benchmarks pays.
        cache_dir = Path(tempfile.mkdtemp(prefix="bench-emb-cache-"))
        emb_cfg = cfg.embedding.model_copy(update={"enabled": True, "cache": True, "cache_dir": cache_dir})
        emb, t_emb_build = timed(EmbeddingIndex, benchmarks, emb_cfg)
        cached, t_emb_cached = timed(EmbeddingIndex, benchmarks, emb_cfg)
        assert cached.cache_hit and np.array_equal(cached.vectors, emb.vectors)
        shutil.rmtree(cache_dir)
        # As the stage runs it: only records the lexical checks did not flag reach the model.
        todo = [i for i, m in enumerate(lex) if m is None or m.candidate]
        found, t_emb = timed(emb.check_many, [texts[i] for i in todo])
        emb_matches: list = [None] * len(texts)
        for i, m in zip(todo, found):
            emb_matches[i] = m
        both = [combine(a, b) for a, b in zip(lex, emb_matches)]
        results["(b) distill + embedding"] = [m is not None and not m.candidate for m in both]
        speed["(b) distill + embedding"] = (t_build + t_emb_build, t_lex + t_emb)
        results = dict(sorted(results.items()))

    # GSM8K train rows matched to a GSM8K test item: print them with both reference answers.
    train = {r["id"]: r for r in read_jsonl(DATA / CLEAN["gsm8k_train"])}
    test = {r["id"]: r for r in read_jsonl(DATA / "benchmarks" / "gsm8k.jsonl")}
    dup_rows = []
    for r, m in zip(rows, lex):
        if r["source"] == "gsm8k_train" and m is not None and m.benchmark == "gsm8k":
            dup_rows.append((r, m))

    names = list(results)
    print(f"command: python tools/bench_decontam.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"config: policy={cfg.policy} ngram={cfg.ngram} threshold={cfg.threshold} short_ngram={cfg.short_ngram} "
          f"short_max_words={cfg.short_max_words} short_threshold={cfg.short_threshold} "
          f"embedding.threshold={cfg.embedding.threshold}; seed={args.seed}; "
          f"{len(bench_texts)} benchmark problems ({', '.join(INDEXED)})\n")
    table = {n: rates(rows, f) for n, f in results.items()}
    print("| rows | n | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for k in KINDS:
        n = table[names[0]][k][1]
        print(f"| recall: {k} | {n} | " + " | ".join(pct(table[x][k]) for x in names) + " |")
    for s in CLEAN:
        n = table[names[0]][s][1]
        print(f"| false positives: {s} | {n} | " + " | ".join(pct(table[x][s]) for x in names) + " |")
    note = "; (b) embeds only rows (a) left" if args.embedding else ""
    print(f"| rows/s (check{note}) | {len(rows)} | " + " | ".join(f"{len(rows) / speed[x][1]:,.0f}" for x in names) + " |")
    print("| index build (s) | | " + " | ".join(f"{speed[x][0]:.1f}" for x in names) + " |")

    if args.embedding:
        print(f"\nembedding index build over {len(bench_texts)} benchmark problems: {t_emb_build:.1f} s cold, "
              f"{t_emb_cached:.2f} s from the cache ({t_emb_build / t_emb_cached:.0f}x)")
    wrong = Counter(r["kind"] for r, m in zip(rows, lex) if r["label"] and m is not None and m.item_id != r["bench_id"])
    print(f"\n(a) flagged copies naming another benchmark item than the copied one: {dict(wrong) or 'none'}")
    by_method = Counter((r["kind"], m.method) for r, m in zip(rows, lex) if m is not None and not m.candidate)
    print(f"(a) method per kind: {dict(sorted(by_method.items()))}")

    exact_clean = [(r, m) for r, m in zip(rows, lex) if not r["label"] and m is not None and m.method == "exact"]
    print(f"\nclean rows whose normalised text IS a benchmark problem (real duplicates, counted in the "
          f"false-positive rows above): {len(exact_clean)}")
    for r, m in exact_clean:
        print(f"- {r['source']} {r['id']} = {m.benchmark} {m.item_id}: {r['text'][:160]!r}")
    print(f"\nGSM8K-train questions (a) matches to GSM8K-test items: {len(dup_rows)}")
    for r, m in dup_rows:
        a_train, a_test = train[r["id"]]["answer"], test[m.item_id]["answer"]
        print(f"- {r['id']} ~ {m.item_id} ({m.method} {m.score:.2f}; answers {a_train} / {a_test})\n"
              f"    train: {r['text'][:300]!r}\n    test:  {m.text[:300]!r}")

    if args.show:
        for name, flags in results.items():
            print(f"\n### {name}: misses and false positives")
            shown: Counter = Counter()
            for r, f, m in zip(rows, flags, lex):
                key = r["kind"] if r["label"] else r["source"]
                if (r["label"] and not f) or (not r["label"] and f):
                    if shown[key] < args.show:
                        shown[key] += 1
                        extra = f" [(a): {m.method} {m.score:.2f} {m.item_id}]" if m is not None else ""
                        print(f"- {key} {r['source']} {r['bench_id'] or r.get('id')}{extra}: {r['text'][:200]!r}")


if __name__ == "__main__":
    main()
