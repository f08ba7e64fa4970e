"""Sample filters: each filter on real-looking and broken samples, the registry, apply_filters."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
from pydantic import ValidationError

from conftest import DATA
from distill.curate.filters import (
    FILTERS, FilterConfig, GarbageFilter, RepetitionFilter, apply_filters, check_garbage, check_repetition,
    filter_names, repeated_ngram_ratio, select_diverse, think_tag_problem,
)
from distill.curate.normalize import word_tokens

# An R1-style chain of thought as reasoning models write it: restated numbers, "wait" checks, a
# recomputation of the same quantity, then a final answer. Healthy; must pass every filter.
LONG_COT = r"""<think>
Okay, let's see. The problem says Janet's ducks lay 16 eggs per day. She eats three for breakfast
every morning and bakes muffins for her friends every day with four. She sells the remainder at the
farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day at the
farmers' market?

First, I need to figure out how many eggs are left after she eats some and uses some for baking.
She starts with 16 eggs. She eats 3, so that leaves 16 - 3 = 13 eggs. Then she uses 4 for muffins,
so 13 - 4 = 9 eggs remain. Those 9 eggs are sold at $2 each, so 9 times 2 is 18 dollars.

Wait, let me double-check that I read the problem correctly. "She eats three for breakfast every
morning" - yes, 3 eggs. "Bakes muffins for her friends every day with four" - that means she uses
four eggs in the muffins, not that she bakes four muffins. I think the natural reading is four eggs,
because the whole sentence is about eggs. If it were four muffins we would need to know how many
eggs go into each muffin, and the problem does not say, so it must be four eggs.

So the eggs used per day are 3 + 4 = 7. The eggs remaining are 16 - 7 = 9. Each egg sells for $2,
so the revenue is 9 * 2 = $18 per day.

Hmm, is there any trick about "fresh" duck eggs? Maybe some eggs are not fresh? The problem does not
mention any spoiled eggs, so I will assume all remaining eggs are sold. Also the question asks
about every day, not per week, so I should not multiply by 7.

Let me verify once more with a different order of operations. Total value of all 16 eggs at $2 each
would be 16 * 2 = $32. The eggs she does not sell are 7, worth 7 * 2 = $14. Subtracting gives
32 - 14 = 18. Same answer, good.

Another sanity check: if she sold all the eggs she would make $32, and she keeps back a little less
than half of them, so the answer should be a bit more than half of 32, i.e. a bit more than 16. 18 fits.

I am fairly confident the answer is 18 dollars.
</think>

Janet's ducks lay 16 eggs a day. She uses 3 for breakfast and 4 for muffins, so she has
16 - 3 - 4 = 9 eggs left to sell. At $2 per egg she makes 9 \times 2 = 18 dollars.

The answer is $\boxed{18}$."""

LOOP = "Let me recompute the total number of eggs: 16 minus 3 minus 4 equals 9, times 2 is 18. " * 40


def sample(**kw) -> dict:
    """A verified sample with healthy defaults; tests override the column under test."""
    rec = {
        "key": f"{kw.get('id', 'q1')}#{kw.get('sample_idx', 0)}", "id": "q1", "problem": "Janet's ducks ...",
        "answer": "18", "source": "test", "sample_idx": 0, "completion": LONG_COT, "reasoning": None,
        "response": "The answer is 18.", "finish_reason": "stop", "n_tokens": 700, "pred_answer": "18",
        "verdict": "equal", "correct": True, "pass_rate": 0.5, "n_samples": 4,
    }
    rec.update(kw)
    return rec


def reference_solutions() -> list[str]:
    """Real human-written solutions (LaTeX-heavy math, olympiad case analyses, GSM8K arithmetic)."""
    out = []
    for name in ("math500", "minerva_math", "olympiadbench", "aime24", "gsm8k"):
        for line in open(DATA / "benchmarks" / f"{name}.jsonl"):
            sol = json.loads(line).get("solution")
            if sol:
                out.append(sol if isinstance(sol, str) else "\n".join(sol))
    assert len(out) > 2500
    return out


def run_one(name: str, rec: dict, **cfg) -> str | None:
    """The reason filter `name` gives `rec` under config overrides `cfg`, or None."""
    fc = FilterConfig.model_validate({name: cfg})
    return FILTERS[name](rec, getattr(fc, name))


# ----------------------------------------------------------------------------- registry and config


def test_every_config_filter_is_registered_and_vice_versa():
    fields = set(FilterConfig.model_fields) - {"order"}
    assert fields == set(FILTERS) == set(filter_names())
    assert FilterConfig().order == filter_names()
    for name, f in FILTERS.items():
        section = type(getattr(FilterConfig(), name))
        assert "enabled" in section.model_fields, name
        for field, info in section.model_fields.items():
            assert info.description, f"curate.filters.{name}.{field} has no docstring"
        assert f.kind in ("sample", "question")


def test_config_errors_name_the_key():
    with pytest.raises(ValidationError, match="curate.filters.order: unknown filter.*repetiton"):
        FilterConfig(order=["repetiton"])
    with pytest.raises(ValidationError, match="named more than once"):
        FilterConfig(order=["length", "length"])
    with pytest.raises(ValidationError, match="curate.filters.difficulty.min_pass_rate=0.8"):
        FilterConfig.model_validate({"difficulty": {"min_pass_rate": 0.8, "max_pass_rate": 0.2}})
    with pytest.raises(ValidationError):
        FilterConfig.model_validate({"repetition": {"max_ratio": 1.5}})
    with pytest.raises(ValidationError):
        FilterConfig.model_validate({"length": {"max_token": 10}})  # typo: extra keys are errors


# ----------------------------------------------------------------------------- per-sample filters


def test_healthy_long_cot_passes_every_sample_filter():
    fc = FilterConfig()
    for f, section in fc.active("sample"):
        assert f(sample(), section) is None, f.name
    assert run_one("think_tags", sample(), require=True) is None


def test_truncated():
    assert run_one("truncated", sample(finish_reason="length")).startswith("truncated: finish_reason=length")
    assert run_one("truncated", sample(pred_answer=None)) == "truncated: no final answer"
    assert run_one("truncated", sample(pred_answer=None), require_answer=False) is None


def test_wrong_answer():
    for verdict in ("not_equal", "no_answer", "timeout", "parse_error"):
        reason = run_one("wrong_answer", sample(verdict=verdict, pred_answer="17", correct=False))
        assert reason.startswith(f"wrong_answer: {verdict}") and "'17'" in reason and "'18'" in reason


def test_repetition_catches_loops_not_reasoning():
    cot_words = word_tokens(LONG_COT)
    assert len(cot_words) > 400
    # The healthy text repeats phrases and numbers, but far below the loop.
    assert repeated_ngram_ratio(cot_words, 8) < 0.1
    assert run_one("repetition", sample()) is None
    assert repeated_ngram_ratio(word_tokens(LOOP), 8) > 0.9
    reason = run_one("repetition", sample(completion=LOOP))
    assert reason.startswith("repetition: ") and "of 8-grams repeated" in reason


def test_repetition_tail_catches_a_loop_after_long_reasoning():
    body = LONG_COT.split("</think>")[0]
    solutions = [json.loads(line)["solution"] for line in list(open(DATA / "benchmarks" / "math500.jsonl"))[:8]]
    text = body + "\n" + "\n".join(solutions) + "\n" + LOOP[: len(LOOP) // 2]
    words = word_tokens(text)
    whole = repeated_ngram_ratio(words, 8)
    assert whole < RepetitionFilter().max_ratio  # diluted: the whole-text ratio alone misses it
    assert "in the last 400 words" in run_one("repetition", sample(completion=text))
    assert run_one("repetition", sample(completion=text), tail_words=None) is None


def test_no_reference_solution_is_repetition_or_garbage():
    rep, gar = RepetitionFilter(), GarbageFilter()
    flagged = [t[:80] for t in reference_solutions()
               if check_repetition({"completion": t}, rep) or check_garbage({"completion": t}, gar)]
    assert flagged == []


def test_length():
    assert run_one("length", sample(n_tokens=0)) == "length: 0 tokens < min 1"
    assert run_one("length", sample(n_tokens=5000), max_tokens=4096) == "length: 5000 tokens > max 4096"
    assert run_one("length", sample(n_tokens=4096), max_tokens=4096) is None
    assert run_one("length", sample(n_tokens=30), min_tokens=50) is not None


@pytest.mark.parametrize(
    "text, require, problem",
    [
        ("<think>a</think>b", True, None),
        ("a</think>b", True, None),  # opened by the chat template
        ("plain answer", False, None),
        ("plain answer", True, "no <think> block"),
        ("<think>a b", False, "<think> never closed"),
        ("<think>a<think>b</think>c", False, "nested <think>"),
        ("<think>a</think>b</think>c", False, "</think> without <think>"),
        ("<think>a</think><think>b</think>c", False, "2 think blocks (max 1)"),
    ],
)
def test_think_tags(text, require, problem):
    assert think_tag_problem(text, require=require, implicit_open=True, max_blocks=1) == problem


def test_think_tags_without_implicit_open():
    assert think_tag_problem("a</think>b", False, implicit_open=False, max_blocks=1) == "</think> without <think>"
    assert run_one("think_tags", sample(completion="a</think>b"), implicit_open=False).startswith("think_tags: ")


def test_garbage_catches_broken_text():
    rng = random.Random(0)
    mojibake = bytes(rng.randrange(256) for _ in range(600)).decode("utf-8", errors="replace")
    chinese = LONG_COT[:300] + "所以答案是十八。我们再检查一遍：十六减三减四等于九，九乘以二等于十八。" * 6
    emoji = LONG_COT[:400] + " ".join("🙂🎉🔥✨💯" for _ in range(60))
    blob = LONG_COT[:400] + " data:" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") for _ in range(300))
    expected = {mojibake: "replacement characters", chinese: "non-Latin", emoji: "text characters", blob: "-character word"}
    for text, what in expected.items():
        reason = run_one("garbage", sample(completion=text))
        assert reason is not None and reason.startswith("garbage: ") and what in reason, (what, reason)
    # A non-English corpus opts out of the script check and passes.
    assert run_one("garbage", sample(completion=chinese), max_non_latin=1.0) is None


def test_garbage_passes_latex_heavy_math():
    latex = (r"By Cauchy--Schwarz, $\left(\sum_{i=1}^{n} a_i b_i\right)^2 \le \left(\sum_{i=1}^n a_i^2\right)"
             r"\left(\sum_{i=1}^n b_i^2\right)$, so $\frac{\sqrt{3}}{2}\cdot\int_0^{\pi}\sin^2\theta\,d\theta"
             r" = \frac{\sqrt{3}\pi}{4}$ and $\mathbb{R}^n \ni x \mapsto \|x\|_2 \geq 0$; "
             r"$\alpha,\beta,\gamma \in \{0,1\}$ and ∑ₖ 𝑥ₖ² ≤ ∞ with $\binom{10}{3}=120$. ") * 5
    assert run_one("garbage", sample(completion=latex)) is None


# ----------------------------------------------------------------------------- per-question filters


def _approach(kind: str, i: int) -> str:
    """Completions in three clusters: near-copies within a cluster, different wording across."""
    texts = {
        "a": "Subtract the eggs she eats and bakes from sixteen, then multiply the remaining eggs by the price "
             "of two dollars to get the daily revenue at the market which is eighteen",
        "b": "Compute the value of all sixteen eggs as thirty two dollars and take away the value of the seven "
             "eggs kept at home worth fourteen dollars leaving eighteen",
        "c": "Per egg sold she earns two so we count sold eggs: nine remain after breakfast and baking, "
             "and nine times two gives eighteen in total",
    }
    return texts[kind] + f" variant {i}."


def test_diverse_selection_takes_one_per_cluster():
    kinds = ["a", "a", "a", "b", "b", "c"]
    texts = [_approach(k, i) for i, k in enumerate(kinds)]
    lengths = [100, 101, 102, 300, 301, 500]  # cluster a is shortest: `shortest` would take only a's
    chosen = select_diverse(texts, lengths, 3, shingle=4)
    assert sorted(kinds[i] for i in chosen) == ["a", "b", "c"]
    assert 0 in chosen  # starts from the shortest


def test_max_per_question_strategies_and_determinism():
    kinds = ["a", "a", "a", "b", "b", "c"]
    recs = [sample(sample_idx=i, completion=_approach(k, i), n_tokens=100 + 100 * "abc".index(k) + i)
            for i, k in enumerate(kinds)]
    for strategy, want in [("shortest", {0, 1, 2}), ("diverse", {0, 3, 5})]:
        fc = FilterConfig.model_validate({"max_per_question": {"enabled": True, "k": 3, "strategy": strategy}})
        results = []
        for seed in range(3):
            shuffled = recs[:]
            random.Random(seed).shuffle(shuffled)
            kept, rejected = apply_filters(shuffled, fc)
            results.append(([r["sample_idx"] for r in kept], [r["reason"] for r in rejected]))
        assert all(r == results[0] for r in results)  # input order does not matter
        kept_idx, reasons = results[0]
        if strategy == "shortest":
            assert set(kept_idx) == want
        else:
            assert {kinds[i] for i in kept_idx} == {"a", "b", "c"}
        assert reasons == [f"max_per_question: 3 of 6 kept ({strategy})"] * 3


def test_difficulty_band():
    def outcome(rate, n=4, **cfg):
        recs = [sample(sample_idx=i, pass_rate=rate, n_samples=n) for i in range(2)]
        _, rejected = apply_filters(recs, FilterConfig.model_validate({"difficulty": cfg}))
        return {r["reason"] for r in rejected}

    assert outcome(1.0) == set()
    assert outcome(1.0, drop_all_correct=True) == {"difficulty: all 4 samples correct (too easy)"}
    assert outcome(1.0, n=1, drop_all_correct=True) == set()  # one sample says little
    assert outcome(0.0) == {"difficulty: no sample of 4 correct"}
    assert outcome(0.25, min_pass_rate=0.3) == {"difficulty: pass rate 0.25 outside [0.3, 1]"}
    assert outcome(0.75, max_pass_rate=0.5) == {"difficulty: pass rate 0.75 outside [0, 0.5]"}
    assert outcome(0.5, min_pass_rate=0.3, max_pass_rate=0.6) == set()


# ----------------------------------------------------------------------------- apply_filters


def _mixed_batch() -> list[dict]:
    recs = []
    for q, rate in [("q2", 0.5), ("q1", 0.75), ("q3", 0.0)]:
        for i in range(4):
            recs.append(sample(id=q, sample_idx=i, pass_rate=rate, n_samples=4))
    recs[0].update(finish_reason="length", verdict="no_answer", pred_answer=None, correct=False)  # q2#0
    recs[1].update(verdict="not_equal", pred_answer="17", correct=False)  # q2#1
    recs[2].update(completion=LOOP, verdict="not_equal", correct=False)  # q2#2: loop AND wrong
    for r in recs[8:]:  # q3: nobody right
        r.update(verdict="not_equal", correct=False, pred_answer="3")
    return recs


def test_apply_filters_reasons_order_and_counts():
    recs = _mixed_batch()
    before = json.dumps(recs, sort_keys=True)
    kept, rejected = apply_filters(recs, FilterConfig())
    assert json.dumps(recs, sort_keys=True) == before  # inputs untouched
    assert len(kept) + len(rejected) == len(recs)
    assert [(r["id"], r["sample_idx"]) for r in kept] == [("q1", i) for i in range(4)] + [("q2", 3)]
    got = {(r["id"], r["sample_idx"]): r["reason"] for r in rejected}
    assert list(got) == sorted(got)
    assert got[("q2", 0)].startswith("truncated: ")  # first failing filter wins
    assert got[("q2", 1)].startswith("wrong_answer: not_equal")
    assert got[("q2", 2)].startswith("wrong_answer: ")  # wrong_answer runs before repetition
    assert all(got[("q3", i)].startswith("wrong_answer: ") for i in range(4))
    for r in rejected:
        assert r["reason"].split(":")[0] in FILTERS
    assert "reason" not in kept[0]


def test_order_and_enabled_come_from_config():
    recs = _mixed_batch()
    fc = FilterConfig.model_validate({"order": ["repetition"], "truncated": {"enabled": False}})
    kept, rejected = apply_filters(recs, fc)
    got = {(r["id"], r["sample_idx"]): r["reason"] for r in rejected}
    assert got[("q2", 2)].startswith("repetition: ")
    assert got[("q2", 0)].startswith("wrong_answer: no_answer")  # truncated is off
    # Without wrong_answer the all-wrong question reaches the difficulty filter.
    fc = FilterConfig.model_validate({"wrong_answer": {"enabled": False}})
    _, rejected = apply_filters(recs, fc)
    assert {r["reason"] for r in rejected if r["id"] == "q3"} == {"difficulty: no sample of 4 correct"}


def test_all_disabled_keeps_everything_sorted():
    recs = _mixed_batch()
    fc = FilterConfig.model_validate({n: {"enabled": False} for n in FILTERS})
    kept, rejected = apply_filters(recs, fc)
    assert rejected == [] and len(kept) == len(recs)
    assert [(r["id"], r["sample_idx"]) for r in kept] == sorted((r["id"], r["sample_idx"]) for r in recs)


def _text_stats_per_char(text: str):
    """The one-pass-per-character definition `text_stats` must agree with."""
    from distill.curate.filters import _TEXT_CATEGORIES, _is_latin_letter

    n_visible = n_text = n_letters = n_foreign = longest = run = 0
    for ch in text:
        run = run + 1 if ch.isalnum() else 0
        longest = max(longest, run)
        if ch.isspace():
            continue
        n_visible += 1
        cat = unicodedata.category(ch)
        n_text += cat in _TEXT_CATEGORIES
        if cat[0] == "L":
            n_letters += 1
            n_foreign += not _is_latin_letter(ord(ch))
    return (n_text / n_visible if n_visible else 1.0, n_foreign / n_letters if n_letters else 0.0, longest,
            text.count("\ufffd"))


def test_text_stats_equals_the_per_character_definition():
    from distill.curate.filters import text_stats

    rng = random.Random(3)
    # Letters of several scripts, digits (ASCII, Arabic-Indic, superscript), underscores, marks,
    # spaces of several kinds, symbols, U+FFFD, emoji, CJK.
    # ASCII controls (\x1c-\x1f are spaces to `isspace`) and a lone surrogate too.
    alphabet = ("abcXYZ019_ \t\n\u00a0\u2003é\u0301ß\u03c0\u0416\u05d0\u0661\u00b2\u2115\U0001d465\u4e2d\ufffd\U0001f600+=$\\{}().,"
                "\x00\x07\x0b\x1c\x1f\x7f`~\ud800")
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        s = text_stats(text)
        assert (s.text_ratio, s.non_latin, s.longest_word, s.replacement_chars) == _text_stats_per_char(text), text


def _plain_repeated_ngram_ratio(words: list[str], n: int) -> float:
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    return 1.0 - len({tuple(words[i : i + n]) for i in range(total)}) / total


def _varied_samples() -> list[dict]:
    """Healthy, looping, garbage, truncated, wrong and edge-case samples over several questions."""
    rng = random.Random(7)
    latex = (r"By Cauchy--Schwarz, $\left(\sum_{i=1}^{n} a_i b_i\right)^2 \le \left(\sum_{i=1}^n a_i^2\right)"
             r"\left(\sum_{i=1}^n b_i^2\right)$, so $\frac{\sqrt{3}}{2}\cdot\int_0^{\pi}\sin^2\theta\,d\theta$"
             r" and ∑ₖ 𝑥ₖ² ≤ ∞ with $\binom{10}{3}=120$, 1{,}000 and 2.50. ")
    prose = LONG_COT.split("</think>")[0].replace("<think>", "")  # no tags: reaches the later filters
    texts = [
        LONG_COT, LOOP, "", " ", "a", "\ufffd", "the " * 300, "x y " * 30, latex * 12, latex * 60,
        prose + "\n" + "\n".join(reference_solutions()[:8]) + "\n" + LOOP[: len(LOOP) // 2],  # loop in the tail
        prose[:300] + "所以答案是十八。我们再检查一遍：十六减三减四等于九。" * 8,
        prose[:400] + " ".join("🙂🎉🔥✨💯" for _ in range(60)),
        prose[:400] + " data:" + "".join(rng.choice("ABCDEFabcdef0123456789") for _ in range(80)),
        bytes(rng.randrange(256) for _ in range(600)).decode("utf-8", errors="replace"),
        "Ｆｕｌｌ ｗｉｄｔｈ ａｎｓｗｅｒ " * 40, "Thе раrаbоlа y = x² hаs ½ of 30° " * 30,
        "ρgh, αx, ωt, sinαcosβ " * 40,
        "twenty five plus thirty - one is fifty six, " * 30, "<think>a</think><think>b</think>c", "a</think>b",
        "<think>" + LONG_COT, "word\x00word\x07 " * 100, "١٢٣ ٤٥٦ " * 100,
    ] + rng.sample(reference_solutions(), 30)
    recs = []
    for i, text in enumerate(texts):
        q, rate = f"q{i % 7}", [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.5][i % 7]
        recs.append(sample(id=q, sample_idx=i, completion=text, n_tokens=len(text.split()), pass_rate=rate))
    for r in recs[::9]:
        r.update(verdict="not_equal", pred_answer="17", correct=False)
    for r in recs[5::11]:
        r.update(finish_reason="length")
    return recs


@pytest.mark.parametrize("overrides", [
    {},
    {"wrong_answer": {"enabled": False}, "repetition": {"n": 3, "max_ratio": 0.3, "tail_words": 100},
     "garbage": {"max_word_chars": 12, "min_text_ratio": 0.99}, "difficulty": {"drop_all_correct": True}},
])
def test_apply_filters_equals_the_plain_definitions(monkeypatch, overrides):
    """The fast paths of the per-sample filters (text statistics, word tokens, n-gram counting)
    change no decision: same kept samples, same reason strings, as with their plain definitions."""
    from distill.curate import filters
    from distill.curate.normalize import normalize_text, words_of_normalized

    recs, fc = _varied_samples(), FilterConfig.model_validate(overrides)

    def decisions():
        kept, rejected = apply_filters(recs, fc)
        return [r["key"] for r in kept], [(r["key"], r["reason"]) for r in rejected]

    for rec in recs:
        words = word_tokens(rec["completion"])
        for n in (1, 2, 8, 50):
            assert filters.repeated_ngram_ratio(words, n) == _plain_repeated_ngram_ratio(words, n)
    fast = decisions()
    monkeypatch.setattr(filters, "text_stats", lambda t: filters.TextStats(*_text_stats_per_char(t)))
    monkeypatch.setattr(filters, "word_tokens", lambda t: words_of_normalized(normalize_text(t)))
    monkeypatch.setattr(filters, "repeated_ngram_ratio", _plain_repeated_ngram_ratio)
    assert fast == decisions()
    reasons = {reason.split(":")[0] for _, reason in fast[1]}
    assert {"truncated", "length", "think_tags", "garbage", "repetition", "difficulty"} <= reasons, reasons
    assert fast[0], "some samples must be kept"
