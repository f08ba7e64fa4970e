"""A labelled, seeded test set for benchmark decontamination.

Contaminated rows are programmatic copies of real benchmark problems (../shared/data/benchmarks),
one kind each:

    exact        the problem verbatim
    reformatted  case, whitespace, punctuation, unicode quotes/dashes changed (3+ edits)
    latex        LaTeX rewritten: \\frac{a}{b} <-> a/b, $ added/removed, \\left( \\right),
                 \\cdot / \\times, ^{2} <-> ^2, \\dfrac -> \\frac (2+ edits where possible)
    prefixed     wrapped in an instruction template (some the normaliser knows, some it does not)
    partial      a contiguous 60-80 % of the problem's words
    paraphrased  synonym swaps, two sentences swapped, numbers <-> number words (3+ edits)
    invisible    format characters inside ~40 % of the words (soft hyphen, zero-width space,
                 zero-width (non-)joiner, word joiner, BOM), sometimes a BOM in front
    confusable   one or two letters of ~40 % of the words (LaTeX command names excepted) swapped
                 for a Cyrillic (2/3) or Greek (1/3) look-alike, anywhere in the word
    unicode_math the LaTeX rendered as unicode, as scraped web pages carry it: x^2 -> x²,
                 \\sqrt{2} -> √2, \\theta -> θ, \\frac{1}{2} -> ½, 30^\\circ -> 30°, \\le -> ≤,
                 x_1 -> x₁, \\angle -> ∠, ..., `$` and \\left/\\right dropped (problems with LaTeX)
    fewshot      invisible + confusable + unicode_math edits at once, the problem then wrapped
                 as the last question of a 2-4-shot prompt of GSM8K-train questions and answers

Clean rows are questions that are not in the benchmarks: GSM8K train, SVAMP and ASDiv (the two
last ones live in benchmarks/ but are clean sources here and must not be indexed).

    python tools/contam_testset.py --per-kind 400 --out /tmp/contam.jsonl   # writes the set

`build_testset()` is what tools/bench_decontam.py and tests/test_decontam.py use.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from distill.fsio import read_jsonl

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
INDEXED = ["gsm8k", "math500", "aime24", "amc23", "minerva_math", "olympiadbench", "college_math", "gaokao2023en"]
CLEAN = {"gsm8k_train": "train/gsm8k_train.jsonl", "svamp": "benchmarks/svamp.jsonl", "asdiv": "benchmarks/asdiv.jsonl"}
KINDS = ["exact", "reformatted", "latex", "prefixed", "partial", "paraphrased",
         "invisible", "confusable", "unicode_math", "fewshot"]
# Kinds added later draw from their own random stream (seeded by seed and kind), so adding one
# leaves every row of the earlier kinds and the clean sample as they were.
_OWN_STREAM = {"invisible", "confusable", "unicode_math", "fewshot"}


# ----------------------------------------------------------------------------- reformatting


def _case(t: str, rng: random.Random) -> str:
    """Lower, upper or title case of the words; LaTeX command names keep their case (a person
    re-typing a problem does not write `\\FRAC`)."""
    change = rng.choice([str.lower, str.upper, str.capitalize])
    return re.sub(r"(?<![\\a-zA-Z])[a-zA-Z]+", lambda m: change(m[0]), t)


def _whitespace(t: str, rng: random.Random) -> str:
    words = t.split(" ")
    return "".join(w + rng.choice(["  ", " \n", "\t", " ", " "]) for w in words).strip()


def _punctuation(t: str, rng: random.Random) -> str:
    t = t.replace(", ", rng.choice([" , ", "; ", " - "]), 3)
    return re.sub(r"[.?]\s*$", rng.choice(["", " ?", "!", " ..."]), t.rstrip()) or t


def _quotes_dashes(t: str, rng: random.Random) -> str:
    t = re.sub(r"'", "\u2019", t)
    t = re.sub(r'"([^"]*)"', "\u201c\\1\u201d", t)
    t = re.sub(r"(?<=\w)-(?=\w)", "\u2013", t)
    return t.replace(", ", " \u2014 ", 1) if rng.random() < 0.5 else t


def reformat(t: str, rng: random.Random) -> tuple[str, int]:
    edits = [_case, _whitespace, _punctuation, _quotes_dashes]
    rng.shuffle(edits)
    for e in edits:
        t = e(t, rng)
    return t, len(edits)


# ----------------------------------------------------------------------------- LaTeX

_LATEX_EDITS = [
    (r"\\[dt]frac", lambda m, r: "\\frac"),
    (r"\\frac\{([^{}]+)\}\{([^{}]+)\}", lambda m, r: f"{m[1]}/{m[2]}" if re.fullmatch(r"[\w.]+", m[1] + m[2]) else f"({m[1]})/({m[2]})"),
    (r"(?<![\w/])(\d+)/(\d+)(?![\w/])", lambda m, r: f"\\frac{{{m[1]}}}{{{m[2]}}}"),
    (r"\^\{(\w)\}", lambda m, r: f"^{m[1]}"),
    (r"\^(\w)(?!\w)", lambda m, r: f"^{{{m[1]}}}"),
    (r"(?<!\\left)(?<!\\right)\(([^()$]{1,40})\)", lambda m, r: f"\\left({m[1]}\\right)"),
    (r"\\cdot|\\times", lambda m, r: r.choice(["\\times", "\\cdot", "*"])),
    (r"\$([^$]{1,60})\$", lambda m, r: r.choice([f"\\({m[1]}\\)", m[1]])),
    (r"(?<![\w.$\\{])(\d+(?:\.\d+)?)(?![\w.}$])", lambda m, r: f"${m[1]}$"),
    (r"\\left\(|\\right\)", lambda m, r: m[0][-1]),
]


def latex_rewrite(t: str, rng: random.Random) -> tuple[str, int]:
    """Apply the applicable rewrites (each to all its occurrences); at most 3 kinds, so the
    result is a plausible re-typing rather than a mangled text."""
    applicable = [(p, f) for p, f in _LATEX_EDITS if re.search(p, t)]
    rng.shuffle(applicable)
    edits = 0
    for pattern, fn in applicable[:3]:
        new = re.sub(pattern, lambda m: fn(m, rng), t)
        if new != t:
            t, edits = new, edits + 1
    return t, edits


# ----------------------------------------------------------------------------- prefixes

TEMPLATES = [
    "Problem: {}",
    "Question: {}\nAnswer:",
    "{}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "Solve the following math problem step by step. {}",
    "Solve the following math problem efficiently and clearly. {}",
    "**Problem:** {}\n\nLet's think step by step.",
    # templates the normaliser does not strip: they must be caught by the n-gram share
    "Here's a problem from my homework, can you help? {}",
    "{} Explain each step and give the final number.",
]


# ----------------------------------------------------------------------------- partial


def partial(t: str, rng: random.Random) -> tuple[str, int]:
    words = t.split()
    keep = max(1, round(len(words) * rng.uniform(0.6, 0.8)))
    start = 0 if rng.random() < 0.5 else rng.randint(0, len(words) - keep)
    return " ".join(words[start : start + keep]), 1


# ----------------------------------------------------------------------------- paraphrase

SYNONYMS = {
    "find": "determine", "compute": "calculate", "calculate": "work out", "determine": "find",
    "how many": "what number of", "total": "overall", "buys": "purchases", "bought": "purchased",
    "each": "every", "has": "owns", "have": "own", "gets": "receives", "makes": "earns",
    "sells": "sold", "spends": "uses", "wants": "would like", "needs": "requires", "large": "big",
    "small": "little", "begin": "start", "finished": "completed", "number": "count",
    "positive": "nonnegative", "smallest": "least", "largest": "greatest", "value": "result",
    "suppose": "assume", "let": "take", "given": "provided", "real": "real-valued",
    "integer": "whole number", "integers": "whole numbers", "people": "persons", "money": "cash",
    "week": "7-day week", "then": "after that", "also": "as well", "if": "when", "there are": "we have",
    "what is": "what's", "does": "will", "many": "lots of", "will": "is going to",
    "shown": "displayed", "consider": "look at", "equal": "the same as", "area": "surface area",
    "dollars": "bucks", "minutes": "mins", "probability": "chance", "exactly": "precisely",
}
_NUM_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
              "fifteen sixteen seventeen eighteen nineteen twenty").split()
_SYN_RE = re.compile(r"(?<!\\)\b(" + "|".join(sorted(map(re.escape, SYNONYMS), key=len, reverse=True)) + r")\b", re.IGNORECASE)


def _keep_case(src: str, dst: str) -> str:
    return dst[0].upper() + dst[1:] if src[0].isupper() else dst


def paraphrase(t: str, rng: random.Random) -> tuple[str, int]:
    """Synonym swaps (up to 3, at random positions), number <-> word for small numbers outside
    LaTeX (up to 2), and two adjacent non-final sentences swapped (a reordered clause)."""
    edits = 0
    spans = [m for m in _SYN_RE.finditer(t)]
    for m in sorted(rng.sample(spans, min(3, len(spans))), key=lambda m: m.start(), reverse=True):
        t = t[: m.start()] + _keep_case(m[0], SYNONYMS[m[0].lower()]) + t[m.end() :]
        edits += 1
    nums = [m for m in re.finditer(r"(?<![\w.$^{\\,/+*=-])(\d{1,2})(?![\w.%}$,/+*=^-])", t) if int(m[1]) <= 20 and "$" not in t]
    for m in sorted(rng.sample(nums, min(2, len(nums))), key=lambda m: m.start(), reverse=True):
        t = t[: m.start()] + _NUM_WORDS[int(m[1])] + t[m.end() :]
        edits += 1
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", t)
    if len(sentences) >= 3:
        i = rng.randrange(0, len(sentences) - 2)
        sentences[i], sentences[i + 1] = sentences[i + 1], sentences[i]
        t = " ".join(sentences)
        edits += 1
    return t, edits


# ----------------------------------------------------------------------------- scraped-text edits

INVISIBLES = ["\u00ad", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]
_PLAIN_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{4,}")  # not a LaTeX command name


def invisible(t: str, rng: random.Random) -> tuple[str, int]:
    """An invisible character at a random inner position of ~40 % of the words of 4+ letters
    (at least 3 where the text has them), and a BOM in front half of the time."""
    words = list(_PLAIN_WORD.finditer(t))
    chosen = [m for m in words if rng.random() < 0.4] or words[:3]
    if len(chosen) < 3:
        chosen = words[:3]
    for m in sorted(chosen, key=lambda m: m.start(), reverse=True):
        k = m.start() + rng.randint(1, len(m[0]) - 1)
        t = t[:k] + rng.choice(INVISIBLES) + t[k:]
    edits = len(chosen)
    if rng.random() < 0.5:
        t, edits = "\ufeff" + t, edits + 1
    return t, edits


CYRILLIC_LOOKALIKE = dict(zip("aeopcyxsijhABEKMHOPCTXYSIJ", "аеорсухѕіјһАВЕКМНОРСТХУЅІЈ"))
GREEK_LOOKALIKE = dict(zip("oivukpxaABEZHIKMNOPTYX", "οινυκρχαΑΒΕΖΗΙΚΜΝΟΡΤΥΧ"))
_ANY_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]+")


def confusable(t: str, rng: random.Random) -> tuple[str, int]:
    """One or two letters of ~40 % of the words (at least 3 where possible) replaced by a
    Cyrillic (2/3) or Greek (1/3) look-alike, at any position of the word."""
    words = [m for m in _ANY_WORD.finditer(t) if any(c in CYRILLIC_LOOKALIKE for c in m[0])]
    chosen = [m for m in words if rng.random() < 0.4]
    if len(chosen) < 3:
        chosen = words[:3]
    chars = list(t)
    edits = 0
    for m in chosen:
        for _ in range(rng.choice([1, 1, 2])):
            table = GREEK_LOOKALIKE if rng.random() < 1 / 3 else CYRILLIC_LOOKALIKE
            spots = [i for i in range(m.start(), m.end()) if chars[i] in table]
            if not spots:
                table = CYRILLIC_LOOKALIKE
                spots = [i for i in range(m.start(), m.end()) if chars[i] in table]
            if spots:
                i = rng.choice(spots)
                chars[i] = table[chars[i]]
                edits += 1
    return "".join(chars), edits


GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ϵ", "varepsilon": "ε",
    "zeta": "ζ", "eta": "η", "theta": "θ", "vartheta": "ϑ", "kappa": "κ", "lambda": "λ", "mu": "μ",
    "nu": "ν", "xi": "ξ", "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ", "phi": "ϕ", "varphi": "φ",
    "chi": "χ", "psi": "ψ", "omega": "ω", "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ",
    "Pi": "Π", "Sigma": "Σ", "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω",
}
SYMBOLS = {
    "angle": "∠", "triangle": "△", "times": "×", "div": "÷", "cdot": "·", "le": "≤", "leq": "≤",
    "leqslant": "⩽", "ge": "≥", "geq": "≥", "geqslant": "⩾", "ne": "≠", "neq": "≠", "infty": "∞",
    "pm": "±", "ldots": "…", "dots": "…", "cdots": "⋯", "to": "→", "in": "∈", "perp": "⊥",
    "parallel": "∥", "approx": "≈", "sim": "∼", "cup": "∪", "cap": "∩", "lfloor": "⌊", "rfloor": "⌋",
    "lceil": "⌈", "rceil": "⌉", "sum": "∑", "int": "∫", "mid": "∣", "emptyset": "∅", "prime": "′",
}
SUPERSCRIPT = dict(zip("0123456789+-=()ni", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱ"))
SUBSCRIPT = dict(zip("0123456789+-=()", "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎"))
VULGAR = {"1/2": "½", "1/3": "⅓", "2/3": "⅔", "1/4": "¼", "3/4": "¾", "1/5": "⅕", "2/5": "⅖",
          "3/5": "⅗", "4/5": "⅘", "1/6": "⅙", "5/6": "⅚", "1/7": "⅐", "1/8": "⅛", "3/8": "⅜",
          "5/8": "⅝", "7/8": "⅞", "1/9": "⅑", "1/10": "⅒"}
BOLD = {c: chr(0x1D41A + i) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")} | {
    c: chr(0x1D400 + i) for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}
BLACKBOARD = {"R": "ℝ", "N": "ℕ", "Z": "ℤ", "Q": "ℚ", "C": "ℂ"}


def _script(arg: str, table: dict[str, str]) -> str | None:
    return "".join(table[c] for c in arg) if arg and all(c in table for c in arg) else None


def _render_frac(m: re.Match) -> str:
    a, b = m[1].strip(), m[2].strip()
    if f"{a}/{b}" in VULGAR:
        return VULGAR[f"{a}/{b}"]
    return f"{a}/{b}" if re.fullmatch(r"[\w.]+", a + b) else f"({a})/({b})"


def _render_power(m: re.Match, table: dict[str, str]) -> str:
    """`^{..}` / `_{..}` as unicode super/subscripts when every character has one, else as is."""
    return _script(m[1] if m[1] is not None else m[2], table) or m[0]


# (name, pattern, replacement): applied in this order, each to all its occurrences.
_RENDER = [
    ("frac", r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}", _render_frac),
    ("sqrt", r"\\sqrt\s*\{([^{}]+)\}", lambda m: "√" + (m[1] if re.fullmatch(r"\w+", m[1]) else f"({m[1]})")),
    ("sqrt", r"\\sqrt\s*(\d+|[A-Za-z])(?![A-Za-z])", lambda m: "√" + m[1]),
    ("degree", r"\^\s*\{?\s*\\circ\s*\}?", lambda m: "°"),
    ("prime", r"\^\s*\{\s*\\prime\s*\}|\^\s*\\prime", lambda m: "′"),
    ("superscript", r"\^\{([^{}]{1,4})\}|\^([0-9n])", lambda m: _render_power(m, SUPERSCRIPT)),
    ("subscript", r"_\{([^{}]{1,4})\}|_([0-9])", lambda m: _render_power(m, SUBSCRIPT)),
    ("greek", r"\\(" + "|".join(sorted(GREEK, key=len, reverse=True)) + r")(?![A-Za-z])", lambda m: GREEK[m[1]]),
    ("symbol", r"\\(" + "|".join(sorted(SYMBOLS, key=len, reverse=True)) + r")(?![A-Za-z])", lambda m: SYMBOLS[m[1]]),
    ("bold", r"\\mathbf\s*\{([A-Za-z])\}", lambda m: BOLD[m[1]]),
    ("blackboard", r"\\mathbb\s*\{([RNZQC])\}", lambda m: BLACKBOARD[m[1]]),
    ("delimiters", r"\\left|\\right|(?<!\\)\$", lambda m: ""),
    ("money", r"\\\$", lambda m: "$"),
]


def unicode_math(t: str, rng: random.Random) -> tuple[str, int]:
    """The LaTeX of `t` rendered as unicode text, every rewrite that applies (a page renders
    all of its math, not a sample). Edits: how many kinds of rewrite changed something."""
    edits = 0
    for _, pattern, fn in _RENDER:
        new = re.sub(pattern, fn, t)
        if new != t:
            t, edits = new, edits + 1
    return t, edits


def renderable(t: str) -> bool:
    return any(re.search(p, t) for name, p, _ in _RENDER if name != "delimiters")


FEWSHOT_TEMPLATES = [
    ("Question: {q}\nAnswer: {a}\n\n", "Question: {q}\nAnswer:"),
    ("Q: {q}\nA: The answer is {a}.\n\n", "Q: {q}\nA:"),
    ("Problem:\n{q}\n\nSolution: ... so the final answer is {a}.\n\n", "Problem:\n{q}\n\nSolution:"),
]


def fewshot(t: str, rng: random.Random, shots: list[dict]) -> tuple[str, int]:
    """Invisible characters, look-alike letters and unicode-rendered math in one copy, which is
    then the last question of a few-shot prompt (`shots`: GSM8K-train rows with answers)."""
    edits = 0
    for edit in (unicode_math, confusable, invisible):
        t, n = edit(t, rng)
        edits += n
    shot, last = rng.choice(FEWSHOT_TEMPLATES)
    prompt = "".join(shot.format(q=s["problem"], a=s["answer"]) for s in shots)
    return prompt + last.format(q=t), edits + 1


# ----------------------------------------------------------------------------- the set


def load_sources(data: Path = DATA) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    bench = {n: read_jsonl(data / "benchmarks" / f"{n}.jsonl") for n in INDEXED}
    clean = {n: read_jsonl(data / p) for n, p in CLEAN.items()}
    return bench, clean


def build_testset(per_kind: int = 400, clean_per_source: int | None = None, seed: int = 0,
                  data: Path = DATA) -> list[dict]:
    """Rows `{text, label, kind, source, bench_id, edits}`: `label` True for contaminated copies
    (kind in KINDS, `bench_id` the benchmark item copied), False for clean rows (kind "clean",
    source the clean set). `per_kind` copies per kind, drawn evenly from the indexed benchmarks;
    `clean_per_source` rows per clean source (None: all). Same arguments, same rows."""
    rng = random.Random(seed)
    bench, clean = load_sources(data)
    rows = []
    per_bench = -(-per_kind // len(INDEXED))
    makers = {
        "exact": lambda t, r: (t, 0),
        "reformatted": reformat,
        "latex": latex_rewrite,
        "prefixed": lambda t, r: (r.choice(TEMPLATES).format(t), 1),
        "partial": partial,
        "paraphrased": paraphrase,
    }
    shots = clean["gsm8k_train"]
    makers |= {
        "invisible": invisible,
        "confusable": confusable,
        "unicode_math": unicode_math,
        "fewshot": lambda t, r: fewshot(t, r, r.sample(shots, r.randint(2, 4))),
    }
    for kind in KINDS:
        krng = random.Random(f"{seed}:{kind}") if kind in _OWN_STREAM else rng
        for name in INDEXED:
            pool = bench[name]
            if kind == "partial":  # a 60-80 % cut of a one-liner is not a copy of anything
                pool = [r for r in pool if len(r["problem"].split()) >= 12]
            if kind == "latex":  # only problems with something to rewrite
                pool = [r for r in pool if any(re.search(p, r["problem"]) for p, _ in _LATEX_EDITS)]
            if kind == "unicode_math":  # only problems with math to render
                pool = [r for r in pool if renderable(r["problem"])]
            for rec in krng.sample(pool, min(per_bench, len(pool))):
                text, edits = makers[kind](rec["problem"], krng)
                rows.append({"text": text, "label": True, "kind": kind, "source": name,
                             "bench_id": rec["id"], "edits": edits})
    for name, recs in clean.items():
        picked = recs if clean_per_source is None else rng.sample(recs, min(clean_per_source, len(recs)))
        rows.extend({"text": r["problem"], "label": False, "kind": "clean", "source": name,
                     "bench_id": None, "edits": 0, "id": r["id"]} for r in picked)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=400)
    ap.add_argument("--clean-per-source", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = build_testset(args.per_kind, args.clean_per_source, args.seed)
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
