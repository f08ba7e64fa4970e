"""Verification throughput: plain sequential math-verify vs distill's Verifier, same pairs, one run.

The pairs look like a teacher run: questions drawn from the real benchmark answers (integers,
fractions, tuples, intervals, LaTeX expressions), `--samples` responses per question, some right
(spelled as given or differently: `0.5` for `\\frac{1}{2}`, `x = 3`, units, spacing), some wrong
(a near miss or another question's answer), some with no answer; each either a bare
`\\boxed{...}` or a chain-of-thought text whose final answer has to be extracted.

- math-verify, as a user would write it: `verify(parse("\\boxed{" + reference + "}"), parse(response))`
  for each pair, in this process, one after the other.
- distill: `extract_answer(response)` and `Verifier.verify(pairs)` (fast path, deduplicated pairs,
  reference caching, `--workers` sandboxed processes). "cold" counts starting and stopping the
  workers (about a second, paid once per Verifier); "warm" has them running already, as in a
  curate actor that verifies shard after shard. CPU seconds include the workers' (start-up too).

Verdicts are compared as correct / not correct (math-verify has no finer verdict); every
disagreement is printed, and so is the count of pairs that the verifier's partial-parse guard
refused (math-verify reads only a fragment of one side; see `distill/curate/verify.py`).

Exactness probes, apart from the table: for each distinct plain-number reference of the drawn
questions, a wrong answer closer than math-verify's 6-decimal rounding (the value plus 10^-7,
written out exactly) and, for integers of 16 digits or more, the value plus one; math-verify's and the
verifier's verdicts on them are counted (the verifier compares exact numbers exactly).

    python tools/bench_verify.py                    # ~1-2 minutes on 2 CPU cores
    python tools/bench_verify.py --questions 100    # quicker
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO.parent / "shared" / "data" / "benchmarks"

ARITHMETIC = ("gsm8k", "svamp", "asdiv", "aime24", "amc23")

FILLER = [
    "Let me set up the problem carefully.",
    "First, we write down what is given: the quantities are {a} and {b}.",
    "Multiplying, {a} \\times {b} = {ab}, so the product is {ab}.",
    "We check the edge case $n = {a}$ separately; it does not change the count.",
    "Substituting $x = {a}$ into the equation gives $2x + {b} = {c}$.",
    "Wait, let me double-check that step: {a} + {b} = {apb}, which is consistent.",
    "So the intermediate value is $\\frac{{{a}}}{{{b}}}$, which we simplify later.",
    "Hmm, that is not quite right. Let me reconsider the constraint on $k$.",
    "By the symmetry of the figure, the two triangles have equal area.",
    "Now we combine the two cases and sum over all {b} possibilities.",
]


def load_answers() -> list[tuple[str, str]]:
    rows = []
    for f in sorted(BENCH.glob("*.jsonl")):
        rows += [(f.stem, json.loads(line)["answer"]) for line in open(f)]
    return rows


def respell(ans: str, rng: random.Random) -> str:
    """The same answer written another way (what different samples of one teacher do)."""
    from distill.curate.verify import plain_number

    p = plain_number(ans)
    if p is not None and p.var is None and not p.percent:
        v = p.value
        choices = [ans, f"{ans}\\text{{ units}}", f"x = {ans}"]
        if v.denominator != 1:
            choices += [f"\\frac{{{v.numerator}}}{{{v.denominator}}}", f"{v.numerator}/{v.denominator}"]
        if v.denominator != 1 and 10**6 % v.denominator == 0:  # terminating decimal
            choices.append(f"{float(v):.6f}".rstrip("0"))
        if v.denominator == 1 and abs(v) >= 1000:
            choices.append(f"{int(v):,}")
        return rng.choice(choices)
    return rng.choice([ans, ans.replace(", ", ","), ans.replace(",", ", "), ans.replace("\\frac", "\\dfrac")])


def near_miss(ans: str, other: str, rng: random.Random) -> str:
    """A wrong answer: an arithmetic slip (off by a little, one digit or sign changed) or, less
    often, another question's answer."""
    from distill.curate.verify import plain_number

    if rng.random() < 0.3:
        return other
    p = plain_number(ans)
    if p is not None:
        v = p.value + rng.choice([1, -1, 2, 10])
        return str(v.numerator) if v.denominator == 1 else f"\\frac{{{v.numerator}}}{{{v.denominator}}}"
    digits = [i for i, c in enumerate(ans) if c.isdigit()]
    if digits:
        i = rng.choice(digits)
        return ans[:i] + rng.choice([d for d in "123456789" if d != ans[i]]) + ans[i + 1 :]
    if "+" in ans or "-" in ans:
        return ans.replace("+", "#").replace("-", "+").replace("#", "-")
    return other


def chain_of_thought(answer: str | None, rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    vals = {"a": a, "b": b, "ab": a * b, "apb": a + b, "c": 2 * a + b}
    lines = [rng.choice(FILLER).format(**vals) for _ in range(rng.randint(8, 30))]
    if answer is None:
        lines.append("Continuing the computation for the remaining")  # truncated, no answer
    else:
        lines.append(rng.choice([
            f"Therefore, the final answer is $\\boxed{{{answer}}}$.",
            f"So the answer is $\\boxed{{{answer}}}$.",
            f"**Final Answer**\n\\[\n\\boxed{{{answer}}}\n\\]",
        ]))
    return "\n\n".join(lines)


def build_pairs(n_questions: int, samples: int, seed: int, mix: str = "benchmarks") -> list[tuple[str, str]]:
    """`mix`: `benchmarks` draws each question from a benchmark picked uniformly (each of the ten
    sets weighs the same); `rows` draws uniformly over all answers, so College Math's long
    symbolic answers make up 30% of the questions; `arithmetic` uses only the sets with integer
    answers (GSM8K, SVAMP, ASDiv, AIME, AMC), as a GSM8K-style distillation run would."""
    rng = random.Random(seed)
    rows = load_answers()
    by_source: dict[str, list[str]] = {}
    for src, ans in rows:
        by_source.setdefault(src, []).append(ans)
    if mix == "rows":
        questions = rng.sample(rows, n_questions)
    else:
        names = sorted(by_source) if mix == "benchmarks" else sorted(ARITHMETIC)
        questions = [(src, rng.choice(by_source[src])) for src in (rng.choice(names) for _ in range(n_questions))]
    pairs = []
    for src, ref in questions:
        p_right = rng.choice([0.9, 0.6, 0.3])  # easy, medium, hard question
        for _ in range(samples):
            u = rng.random()
            if u < 0.05:
                pred = None
            elif u < 0.05 + 0.95 * p_right:
                pred = respell(ref, rng)
            else:
                pred = near_miss(ref, rng.choice(by_source[src]), rng)
            if rng.random() < 0.5:
                response = chain_of_thought(pred, rng)
            else:
                response = f"\\boxed{{{pred}}}" if pred is not None else "I am not sure."
            pairs.append((response, ref))
    return pairs


def exactness_probes(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(wrong answer, reference) pairs that differ below math-verify's rounding: the reference
    plus 10^-7 as an exact decimal, and a 16-digit (or longer) integer reference plus one."""
    from distill.curate.verify import plain_number

    out = []
    for ref in sorted({ref for _, ref in pairs}):
        p = plain_number(ref)
        if p is None or p.var is not None or p.percent:
            continue
        if p.value.denominator != 1 and 10**6 % p.value.denominator != 0:
            continue  # 1/3: no exact decimal is near it, only roundings
        v = p.value + Fraction(1, 10**7)
        out.append((_decimal(v, 7), ref))
        if p.value.denominator == 1 and abs(p.value) >= 10**15:  # beyond 15-digit floats
            out.append((str(p.value.numerator + 1), ref))
    return out


def _decimal(v, places: int) -> str:
    """`v` (a Fraction with a terminating expansion within `places`) as an exact decimal string."""
    scaled = v * 10**places
    assert scaled.denominator == 1
    n = scaled.numerator
    sign, n = ("-" if n < 0 else ""), abs(n)
    return f"{sign}{n // 10**places}.{n % 10**places:0{places}d}"


def run_math_verify(pairs: list[tuple[str, str]]) -> tuple[list[bool], list[float]]:
    """math-verify on each pair, and the seconds each took (timer overhead ~1 us a pair)."""
    from math_verify import parse, verify

    out, secs = [], []
    for response, ref in pairs:
        t0 = time.perf_counter()
        out.append(verify(parse("\\boxed{" + ref + "}"), parse(response)))
        secs.append(time.perf_counter() - t0)
    return out, secs


def run_distill(pairs: list[tuple[str, str]], workers: int, warm: bool):
    """Verdicts, wall seconds, CPU seconds (this process + the workers) and counters. `warm`: the workers are started before the clock starts, as in
    a curate actor that verifies shard after shard."""
    from distill.curate.answers import extract_answer
    from distill.curate.verify import Verifier, VerifyConfig

    c0 = time.process_time()
    with Verifier(VerifyConfig(workers=workers)) as v:
        if warm:
            v.start()
        t0 = time.perf_counter()
        verdicts = v.verify([(extract_answer(resp), ref) for resp, ref in pairs])
        dt = time.perf_counter() - t0
        info = dict(v.stats) | {"restarts": v._pool.restarts if v._pool else 0}
    if not warm:
        dt = time.perf_counter() - t0  # worker shutdown counts for a cold one-off call
    cpu = time.process_time() - c0 + v.worker_cpu_s
    return verdicts, dt, cpu, info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=300, help="questions drawn from the benchmark answers")
    ap.add_argument("--samples", type=int, default=8, help="responses per question (a teacher's n)")
    ap.add_argument("--workers", type=int, default=2, help="Verifier worker processes")
    ap.add_argument("--mix", choices=("benchmarks", "rows", "arithmetic"), default="benchmarks",
                    help="benchmarks: each benchmark equally likely; rows: each answer equally likely; "
                    "arithmetic: integer-answer sets only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # math-verify logs every parse timeout it meets
    from distill.curate.answers import extract_answer
    from distill.curate.verify import plain_number

    pairs = build_pairs(args.questions, args.samples, args.seed, args.mix)
    import math_verify  # noqa: F401 - imports out of both timings
    import sympy  # noqa: F401

    t0, c0 = time.perf_counter(), time.process_time()
    baseline, secs = run_math_verify(pairs)
    t_mv, c_mv = time.perf_counter() - t0, time.process_time() - c0
    verdicts, t_d, c_d, info = run_distill(pairs, args.workers, warm=False)
    verdicts_w, t_w, c_w, _ = run_distill(pairs, args.workers, warm=True)
    diff_w = sum(a.correct != b for a, b in zip(verdicts_w, baseline))

    ours = [v.correct for v in verdicts]
    diff = [i for i, (a, b) in enumerate(zip(baseline, ours)) if a != b]
    n = len(pairs)
    cmd = "python tools/bench_verify.py " + " ".join(argv if argv is not None else sys.argv[1:])
    guarded = sum("partial-parse guard" in v.detail for v in verdicts)
    print(f"\n{n} pairs ({args.questions} questions x {args.samples} samples, mix={args.mix}), "
          f"{sum(baseline)} correct per math-verify; distill: {info.get('fast', 0)} by the fast path, "
          f"{info.get('symbolic', 0)} distinct symbolic checks, {info['restarts']} worker restarts, "
          f"{guarded} pairs refused by the partial-parse guard\n")
    print("| verifier | references | pairs | seconds | verdicts/s | speed-up | CPU seconds | agreement |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| math-verify, sequential | all | {n} | {t_mv:.1f} | {n / t_mv:.0f} | 1.0x | {c_mv:.1f} | - |")
    print(f"| distill Verifier, {args.workers} workers, cold | all | {n} | {t_d:.2f} | {n / t_d:.0f} | "
          f"{t_mv / t_d:.1f}x | {c_d:.1f} | {1 - len(diff) / n:.4f} ({len(diff)} differ) |")
    print(f"| distill Verifier, {args.workers} workers, warm | all | {n} | {t_w:.2f} | {n / t_w:.0f} | "
          f"{t_mv / t_w:.1f}x | {c_w:.1f} | {1 - diff_w / n:.4f} ({diff_w} differ) |")
    # The same pairs split by the reference's kind, each part verified by a fresh Verifier and
    # compared with math-verify's time on those pairs (per-pair timings of the run above).
    plain = [i for i, (_, ref) in enumerate(pairs) if plain_number(ref) is not None]
    other = sorted(set(range(n)) - set(plain))
    for label, idx in (("plain numbers", plain), ("LaTeX / text", other)):
        if not idx:
            continue
        t_base = sum(secs[i] for i in idx)
        _, t_part, c_part, _ = run_distill([pairs[i] for i in idx], args.workers, warm=True)
        print(f"| math-verify, sequential | {label} | {len(idx)} | {t_base:.1f} | {len(idx) / t_base:.0f} | "
              f"1.0x | - | - |")
        print(f"| distill Verifier, {args.workers} workers, warm | {label} | {len(idx)} | {t_part:.2f} | "
              f"{len(idx) / t_part:.0f} | {t_base / t_part:.1f}x | {c_part:.1f} | - |")
    probes = exactness_probes(pairs)
    if probes:
        mv_probe, _ = run_math_verify([(f"\\boxed{{{a}}}", ref) for a, ref in probes])
        d_probe, _, _, _ = run_distill([(f"\\boxed{{{a}}}", ref) for a, ref in probes], args.workers, warm=True)
        from distill.curate.verify import approximates

        def rounding(a: str, ref: str) -> bool:
            p, r = plain_number(a), plain_number(ref)
            return approximates(p.value, p.places, r.value, r.places)

        print(f"\nexactness probes: {len(probes)} wrong answers closer than 10^-6 to a plain-number reference "
              f"(or a 16+ digit integer reference + 1); called right by math-verify / distill:")
        for label, want in (("exact under the rule", False), ("reference may round the answer (tolerance)", True)):
            idx = [i for i, (a, ref) in enumerate(probes) if rounding(a, ref) == want]
            print(f"  {label}: {len(idx)} probes, {sum(mv_probe[i] for i in idx)} / "
                  f"{sum(d_probe[i].correct for i in idx)}")
        changed = [(probes[i], d_probe[i].code) for i in range(len(probes)) if mv_probe[i] != d_probe[i].correct]
        print(f"  verdicts that differ from math-verify: {changed}")
    slow = sorted(secs, reverse=True)
    print(f"\nmath-verify's 1% slowest pairs took {sum(slow[: max(1, n // 100)]):.1f} s of its {sum(secs):.1f} s.")
    print(f"\ncommand: `{cmd.strip()}`")
    if diff:
        print(f"\n{len(diff)} disagreements (math-verify correct?, distill verdict, extracted, reference):")
        for i in diff:
            resp, ref = pairs[i]
            tail = resp[-80:].replace("\n", " ")
            print(f"  mv={baseline[i]!s:5} distill={verdicts[i].code:11} extracted={extract_answer(resp)!r:.120} "
                  f"ref={ref!r:.120} detail={verdicts[i].detail!r} response_tail={tail!r}")


if __name__ == "__main__":
    main()
