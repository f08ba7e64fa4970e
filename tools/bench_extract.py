"""Answer extraction on real text: precision, recall and no-answer rate, old extractor vs new,
plus the time each takes on degenerate inputs (whitespace loops, unclosed boxes).

Sets (all real text, none synthetic):

- `smollm2`: completions of SmolLM2-135M-Instruct (the packaged model, hf engine) to MATH and
  GSM8K train questions, prompted without any answer-format instruction, each labelled by hand
  with the final answer the text states, or null when it states none
  (tools/data/extraction_labelled.jsonl; `--generate` makes the unlabelled file again).
- `math_solutions`: the human-written MATH train solutions with every `\\boxed{X}` replaced by X
  (the box removed, the prose left); label = the dataset's answer (its last box).
- `gsm8k_solutions`: the GSM8K train solutions with the `#### N` line removed; label = N.

Precision: of the answers extracted, the share equal to the label. Recall: of the items with a
label, the share whose label was extracted. An answer extracted where the label is null counts
against precision. "Equal" is a normalised string compare (`same_answer`: spaces, `$`,
`\\left`/`\\right`, `\\dfrac`, `\\text{}` wrappers, trailing periods and a one-letter `x =` ignored; plain numbers
and `\\frac{a}{b}` compared by value), not the verifier: deterministic, no sandbox, and strict
(`5 apples` for 5 counts as wrong here although the verifier accepts it).

The old extractor is `distill/curate/answers.py` as of `--old-rev` (the last commit before the
rewrite), loaded from git into a temporary module, so no frozen copy lives in the repo.

    python tools/bench_extract.py                 # ~1 minute on 2 CPU cores
    python tools/bench_extract.py --limit 1000    # quicker: first 1000 solutions of each set
    python tools/bench_extract.py --generate OUT  # regenerate the SmolLM2 completions (unlabelled)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import random
import re
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO.parent / "shared" / "data" / "train"
LABELLED = REPO / "tools" / "data" / "extraction_labelled.jsonl"
OLD_REV = "5d28103"  # the last commit with the previous answers.py

sys.path.insert(0, str(REPO))

from distill.fsio import read_jsonl  # noqa: E402

# --------------------------------------------------------------------------- comparison

_LAYOUT = re.compile(r"\\[,;:! ]|\\left|\\right|\\displaystyle|\s+|\^\\circ|\^\{\\circ\}|\\%|%")
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")


def _norm(s: str) -> str:
    s = s.strip().strip("$").strip().rstrip(".").strip()
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _TEXT.sub(r"\1", s)
    s = _LAYOUT.sub("", s)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _value(s: str) -> Fraction | None:
    if m := _FRAC.fullmatch(s):
        return (-1 if m.group(1) else 1) * Fraction(int(m.group(2)), int(m.group(3)))
    try:
        return Fraction(s) if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?", s) else None
    except (ValueError, ZeroDivisionError):
        return None


_ASSIGN = re.compile(r"^[A-Za-z]=(?!=)")  # `x = 5` for 5: the verifier unwraps it too


def same_answer(pred: str, label: str) -> bool:
    a, b = _ASSIGN.sub("", _norm(pred)), _ASSIGN.sub("", _norm(label))
    if a == b:
        return True
    va, vb = _value(a), _value(b)
    return va is not None and va == vb


# --------------------------------------------------------------------------- sets


def smollm2_set() -> list[tuple[str, str | None]]:
    return [(r["completion"], r["label"]) for r in read_jsonl(LABELLED)]


def math_solutions(limit: int | None) -> list[tuple[str, str | None]]:
    from distill.curate.answers import _box_spans

    out = []
    for r in read_jsonl(TRAIN / "math_train.jsonl"):
        sol = r["solution"]
        spans = _box_spans(sol)
        if r["answer"] is None or not spans or any(end is None for _, end in spans):
            continue
        # Unbox from the last box back, so earlier offsets stay valid; `\boxed 5` has no braces.
        for start, end in reversed(spans):
            opener = sol.rfind("\\", 0, start)
            close = end + 1 if sol[start - 1] == "{" else end
            sol = sol[:opener] + sol[start:end] + sol[close:]
        out.append((sol, r["answer"]))
        if limit and len(out) >= limit:
            break
    return out


def gsm8k_solutions(limit: int | None) -> list[tuple[str, str | None]]:
    out = []
    for r in read_jsonl(TRAIN / "gsm8k_train.jsonl"):
        body, _, answer = r["solution"].rpartition("####")
        out.append((body.rstrip(), answer.strip().replace(",", "")))
        if limit and len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------- extractors


def load_old(rev: str):
    """`distill/curate/answers.py` at `rev`, as a module (`git show`, no copy in the tree)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:distill/curate/answers.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "answers_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("answers_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def score(extract, items: list[tuple[str, str | None]]) -> dict:
    got = [extract(text) for text, _ in items]
    extracted = [(g, lab) for g, lab in zip(got, (lab for _, lab in items)) if g is not None]
    right = sum(lab is not None and same_answer(g, lab) for g, lab in extracted)
    labelled = sum(lab is not None for _, lab in items)
    return {
        "n": len(items),
        "labelled": labelled,
        "extracted": len(extracted),
        "right": right,
        "precision": right / len(extracted) if extracted else float("nan"),
        "recall": right / labelled if labelled else float("nan"),
        "no_answer": 1 - len(extracted) / len(items),
    }


# --------------------------------------------------------------------------- timing

DEGENERATE = {
    "100k blank lines, then \"The answer is 5\"": lambda: "\n" * 100_000 + "The answer is 5",
    "20k lines of \"\\n \"": lambda: "\n " * 20_000 + "x",
    "20k unclosed `\\boxed{`": lambda: "\\boxed{" * 20_000,
    "20k `\\boxed 1 `": lambda: "\\boxed 1 " * 20_000,
    "100k `$`": lambda: "$" * 100_000,
    "20k `$5 and $`": lambda: "$5 and $" * 20_000,
    "50k unclosed `\\(`": lambda: "\\(" * 50_000,
    "\"Answer:\" + 50k lines \"answer\"": lambda: "answer\n" * 50_000,
}


def _time_one(rev: str | None, name: str, queue) -> None:
    mod = load_old(rev) if rev else __import__("distill.curate.answers", fromlist=["x"])
    text = DEGENERATE[name]()
    started = time.perf_counter()
    mod.extract_answer(text)
    queue.put(time.perf_counter() - started)


def time_degenerate(rev: str | None, name: str, cap_s: float) -> float | None:
    """Seconds `extract_answer` takes on one degenerate input, in a child process; None past `cap_s`."""
    queue = mp.get_context("fork").Queue()
    proc = mp.get_context("fork").Process(target=_time_one, args=(rev, name, queue))
    proc.start()
    proc.join(cap_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return queue.get()


# --------------------------------------------------------------------------- generation


TEMPLATES = ["{problem}", "{problem}\nSolve the problem step by step and state the final answer."]


def generate(out: Path, n_math: int, n_gsm: int, seed: int, max_tokens: int = 300, batch: int = 16) -> None:
    """SmolLM2-135M-Instruct completions (temperature 0.7, `max_tokens`) to questions drawn from
    MATH and GSM8K train, the two plain prompts alternating per pair (each set gets both); written without labels."""
    from distill.config import HFEngineConfig
    from distill.teachers.base import Request, SamplingParams
    from distill.teachers.hf import HFEngine

    rng = random.Random(seed)
    rows = rng.sample(read_jsonl(TRAIN / "math_train.jsonl"), n_math)
    rows += rng.sample(read_jsonl(TRAIN / "gsm8k_train.jsonl"), n_gsm)
    eng = HFEngine(HFEngineConfig(model="smollm2-135m-instruct", batch_size=batch))
    # MATH and GSM8K interleaved, written a batch at a time: a run cut short still gives a mix.
    rows = [r for pair in zip(rows[:n_math], rows[n_math:]) for r in pair]
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=max_tokens, seed=0)
    with open(out, "w") as f:
        for b in range(0, len(rows), batch):
            chunk = rows[b : b + batch]
            reqs = [Request([{"role": "user", "content": TEMPLATES[(b + i) // 2 % 2].format(problem=r["problem"])}],
                            seed=1000 + b + i) for i, r in enumerate(chunk)]
            for i, (r, res) in enumerate(zip(chunk, eng.generate(reqs, params))):
                c = res.completions[0]
                f.write(json.dumps({"id": r["id"], "prompt_template": TEMPLATES[(b + i) // 2 % 2], "completion": c.text,
                                    "finish_reason": c.finish_reason, "label": None}) + "\n")
            f.flush()
    eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="first N solutions of each solution set")
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision of the old answers.py")
    ap.add_argument("--cap-s", type=float, default=60.0, help="give up timing one degenerate input after this")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--n", type=int, default=150, help="--generate: completions (half MATH, half GSM8K)")
    ap.add_argument("--seed", type=int, default=12, help="--generate: which questions")
    ap.add_argument("--max-tokens", type=int, default=300, help="--generate: new tokens per completion")
    ap.add_argument("--batch", type=int, default=16, help="--generate: sequences decoded together")
    ap.add_argument("--generate", type=Path, help="write fresh unlabelled SmolLM2 completions here and exit")
    args = ap.parse_args()
    if args.generate:
        generate(args.generate, args.n // 2, args.n - args.n // 2, args.seed, args.max_tokens, args.batch)
        return

    from distill.curate.answers import extract_answer

    old = load_old(args.old_rev)
    sets = {} if args.timing_only else {
        "smollm2 (hand-labelled)": smollm2_set(),
        "math_solutions (box removed)": math_solutions(args.limit),
        "gsm8k_solutions (#### removed)": gsm8k_solutions(args.limit),
    }
    if sets:
        print("| set | n | labelled | old precision | new precision | old recall | new recall "
              "| old no-answer | new no-answer |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, items in sets.items():
        o, n = score(old.extract_answer, items), score(extract_answer, items)
        print(f"| {name} | {o['n']} | {o['labelled']} | {o['precision']:.1%} | **{n['precision']:.1%}** "
              f"| {o['recall']:.1%} | {n['recall']:.1%} | {o['no_answer']:.1%} | {n['no_answer']:.1%} |")
    if args.no_timing:
        return
    print(f"\n| degenerate input | old `extract_answer` | new |\n| --- | ---: | ---: |")
    for name in DEGENERATE:
        t_old = time_degenerate(args.old_rev, name, args.cap_s)
        t_new = time_degenerate(None, name, args.cap_s)
        fmt = lambda t: f"> {args.cap_s:.0f} s" if t is None else f"{t:.3f} s"  # noqa: E731
        print(f"| {name} | {fmt(t_old)} | {fmt(t_new)} |", flush=True)


if __name__ == "__main__":
    main()
