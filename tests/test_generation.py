"""Pure parts of generation: planning, keys, seeds, prompts, reasoning split, unit -> records."""

from distill.config import OpenAIEngineConfig, PromptConfig
from distill.generation import build_messages, changed_questions, iter_units, run_unit, sample_key
from distill.teachers.base import SamplingParams, derive_seed, split_reasoning
from distill.teachers.openai import OpenAIEngine
from distill.testing.fault_server import FaultServer, respond

QS = [{"id": f"q{i}", "problem": f"problem {i}", "answer": str(i), "source": "t"} for i in range(5)]


def plan_units(questions, **kw):
    return list(iter_units(questions, **kw))


def test_plan_covers_exactly_the_missing_keys_in_fixed_shards():
    units = plan_units(QS, n_samples=3, params_hash="h", done=set(), shard_size=4, first_index=7, base_seed=0)
    keys = [t.key for u in units for t in u.tasks]
    assert len(keys) == len(set(keys)) == 15
    assert [u.index for u in units] == [7, 8, 9, 10] and [len(u.tasks) for u in units] == [4, 4, 4, 3]
    # raising n_samples after everything was done plans only the new sample indices
    more = plan_units(QS, n_samples=5, params_hash="h", done=set(keys), shard_size=4, first_index=11, base_seed=0)
    assert sorted((t.question["id"], t.sample_idx) for u in more for t in u.tasks) == \
        sorted((q["id"], s) for q in QS for s in (3, 4))
    # same inputs, same plan (a resumed driver recomputes it)
    again = plan_units(QS, n_samples=3, params_hash="h", done=set(), shard_size=4, first_index=7, base_seed=0)
    assert [[t.key for t in u.tasks] for u in again] == [[t.key for t in u.tasks] for u in units]


def test_keys_and_seeds_are_stable_and_distinct():
    assert sample_key("q1", 2, "abc") == "q1#2#abc"
    seeds = {derive_seed(0, q["id"], s) for q in QS for s in range(4)}
    assert len(seeds) == 20 and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(0, "q1", 0) == derive_seed(0, "q1", 0) != derive_seed(1, "q1", 0)
    assert derive_seed(None, "q1", 0) is None


def test_changed_questions():
    stored = [{"id": "q1", "problem": "problem 1"}, {"id": "q2", "problem": "old text"}, {"id": "gone", "problem": "x"}]
    assert changed_questions(stored, QS) == ["q2"]
    # Both sides may be one-pass streams (the stage reads them shard by shard).
    assert changed_questions(iter(stored), iter(QS)) == ["q2"]
    assert changed_questions(iter(stored), iter([])) == []


def test_prompt_keeps_latex_braces_and_system():
    msgs = build_messages(r"Find $\frac{1}{2}$ of {x}", PromptConfig(system="Think.", template="Q: {problem}\nA:"))
    assert msgs == [{"role": "system", "content": "Think."}, {"role": "user", "content": "Q: Find $\\frac{1}{2}$ of {x}\nA:"}]


def test_split_reasoning():
    assert split_reasoning("<think>a b</think> final") == ("a b", "final")
    assert split_reasoning("a b</think>\nfinal") == ("a b", "final")  # opening tag in the template
    assert split_reasoning("<think>cut off mid") == ("cut off mid", "")
    assert split_reasoning("plain answer") == (None, "plain answer")
    assert split_reasoning("<think>x</think>y</think>z") == ("x</think>y", "z")


def test_run_unit_turns_results_into_records_and_rejections():
    qs = QS[:2] + [{"id": "long", "problem": "TOO_LONG", "answer": None, "source": "t"}]
    (unit,) = plan_units(qs, n_samples=2, params_hash="h", done=set(), shard_size=10, first_index=0, base_seed=3)
    prompt = PromptConfig()
    with FaultServer() as server, OpenAIEngine(OpenAIEngineConfig(base_url=server.base_url, model="m")) as engine:
        res = run_unit(engine, unit, SamplingParams(max_new_tokens=30), prompt, "openai:m", "h")
    assert [r["key"] for r in res.rejected] == ["long#0#h", "long#1#h"]
    assert res.rejected[0]["reason"].startswith("http_400")
    assert len(res.records) == 4
    for r in res.records:
        text, finish, n = respond(r["problem"], derive_seed(3, r["id"], r["sample_idx"]), 30)
        assert (r["completion"], r["finish_reason"], r["n_tokens"]) == (text, finish, n)
        assert r["reasoning"] == split_reasoning(text)[0] and r["teacher"] == "openai:m"
