"""The verify stage's LLM-judge fallback against a real OpenAI-compatible server on loopback.

The server plays a teacher that grades answers: it reads the reference and the student answer
out of the judge prompt and replies from a table the test writes, so every verdict below follows
from that table. Pairs the symbolic path decides never reach it; free-text references do.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import DATA

from distill.config import GenerateConfig
from distill.curate.verify import VerifyConfig
from distill.loopback import LoopbackServer

NO_SOLUTION = "There is no solution."  # real College Math references (free text)
NO_K_PREFIX = "There is no possible choice of $k$"


def _reference(prefix: str) -> str:
    for f in sorted((DATA / "benchmarks").glob("*.jsonl")):
        for line in open(f):
            answer = json.loads(line)["answer"]
            if answer.startswith(prefix):
                return answer
    raise LookupError(prefix)


class GradingServer(LoopbackServer):
    """/v1/chat/completions answering `replies[(reference, answer)]`; records what it was asked."""

    thread_name = "grading-server"

    def __init__(self, replies: dict[tuple[str, str], str]):
        super().__init__()
        self.replies = replies
        self.asked: list[tuple[str, str]] = []

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def _app(self):
        from aiohttp import web

        async def chat(request):
            body = await request.json()
            user = body["messages"][-1]["content"]
            ref = user.split("Reference answer:\n", 1)[1].split("\n\nStudent answer:\n", 1)[0]
            ans = user.split("Student answer:\n", 1)[1].split("\n\nDoes the student's", 1)[0]
            self.asked.append((ref, ans))
            text = self.replies[(ref, ans)]
            return web.json_response({
                "id": f"chatcmpl-{len(self.asked)}", "object": "chat.completion", "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
            })

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


def _rec(qid, answer, i, boxed):
    return {"key": f"{qid}:{i}", "id": qid, "problem": f"problem {qid}", "answer": answer, "source": "t",
            "sample_idx": i, "completion": "", "reasoning": None, "response": f"So $\\boxed{{{boxed}}}$.",
            "finish_reason": "stop", "n_tokens": 10}


def test_judge_decides_what_the_symbolic_path_cannot():
    from distill.stages.verify import _process, _setup

    no_k = _reference(NO_K_PREFIX)
    records = [
        _rec("text", NO_SOLUTION, 0, "\\text{No solution}"),
        _rec("text", NO_SOLUTION, 1, "\\text{No solution}"),  # same triple: judged once
        _rec("text", NO_SOLUTION, 2, "x = 2"),
        _rec("text", NO_SOLUTION, 3, "\\text{none}"),
        _rec("k", no_k, 0, "\\text{no such } k"),  # math-verify reads `$k$` alone: not_equal
        _rec("num", "12", 0, "12"),  # decided symbolically: never judged
        _rec("num", "12", 1, "13"),
        _rec("vote", None, 0, "7"),  # no reference: majority, never judged
        _rec("vote", None, 1, "\\text{seven}"),
    ]
    replies = {
        (NO_SOLUTION, "\\text{No solution}"): "Yes.",
        (NO_SOLUTION, "x = 2"): "<think>The reference says none; x = 2 is a solution, yes?</think>No",
        (NO_SOLUTION, "\\text{none}"): "I cannot tell.",  # no yes/no: verdict unchanged
        (no_k, "\\text{no such } k"): "yes",
    }
    with GradingServer(replies) as server:
        gen = GenerateConfig(engine="openai", openai={"base_url": server.base_url, "model": "judge",
                                                     "api_key_env": None, "max_retries": 0, "timeout_s": 30})
        # Off by default: the same records, no request.
        state = _setup(VerifyConfig(workers=1), gen)
        try:
            plain, _, plain_stats = _process(state, records)
        finally:
            state[1].close()
        assert server.asked == [] and state[2] is None
        state = _setup(VerifyConfig(workers=1, judge={"enabled": True}), gen)
        try:
            out, rejected, stats = _process(state, records)
        finally:
            state[1].close()
    by = {r["key"]: r for r in out}
    before = {r["key"]: r for r in plain}
    # Only the undecided pairs against a reference were asked, each distinct one once.
    assert Counter(server.asked) == Counter(replies.keys())
    assert all(before[f"text:{i}"]["verdict"] in ("parse_error", "timeout") for i in range(4))
    assert before["k:0"]["verdict"] == "not_equal"  # a prose reference: math-verify's "no" is not trusted
    assert [by[f"text:{i}"]["verdict"] for i in range(4)] == ["equal", "equal", "not_equal", before["text:3"]["verdict"]]
    assert by["text:0"]["verdict_detail"].startswith("judge: yes (symbolic path: ")
    assert by["text:2"]["verdict_detail"].startswith("judge: no (symbolic path: ")
    assert by["text:3"]["verdict_detail"].endswith("the judge's reply had no yes/no")
    assert by["k:0"]["verdict"] == "equal" and by["k:0"]["verdict_detail"].startswith("judge: yes")
    for k in ("num:0", "num:1", "vote:0", "vote:1"):
        assert by[k]["verdict"] == before[k]["verdict"] and not by[k]["verdict_detail"].startswith("judge")
    # pass_rate, correct and agreement follow the judged verdicts.
    assert by["text:0"]["correct"] and by["text:0"]["pass_rate"] == pytest.approx(2 / 4)
    assert by["text:0"]["label"] == NO_SOLUTION and by["text:0"]["agreement"] == pytest.approx(2 / 4)
    assert rejected == []
    assert stats["judged_equal"] == 3 and stats["judged_not_equal"] == 1 and stats["judged_unreadable"] == 1
    assert not any(k.startswith("judge") for k in plain_stats)


def test_judge_cap_leaves_the_rest_undecided():
    from distill.curate.verify import Verifier, verify_records

    asked = []

    def judge(triples):
        asked.extend(triples)
        return [True] * len(triples)

    records = [_rec("t", NO_SOLUTION, i, f"\\text{{answer {c}}}") for i, c in enumerate("abc")]
    cfg = VerifyConfig(workers=1, judge={"enabled": True, "max_pairs": 1})
    stats = Counter()
    with Verifier(cfg) as v:
        out = verify_records(records, v, cfg, judge=judge, stats=stats)
    assert len(asked) == 1 and stats == Counter(judged_equal=1, judge_skipped=2)
    assert sorted(r["verdict"] for r in out) == ["equal", "parse_error", "parse_error"]


def test_which_verdicts_go_to_the_judge():
    from distill.curate.verify import free_text, judge_candidate

    prose = [NO_SOLUTION, _reference(NO_K_PREFIX), "3 is the only possible value", "\\text{no real roots}"]
    maths = ["x = 5", "\\frac{\\pi}{2}", "\\sin x + \\cos x", "5 \\text{ cm}", "$\\max$ at $-1, \\min$ at 1",
             "A=x(500-2 x),\\{x \\mid 0 \\leq x \\leq 250\\}"]
    assert all(free_text(t) for t in prose) and not any(free_text(t) for t in maths)
    assert judge_candidate("parse_error", "math-verify could not parse the reference", "x^2")
    assert judge_candidate("timeout", "a math-verify comparison ran past 5 s", "x^2")
    assert judge_candidate("not_equal", "math-verify", NO_SOLUTION)
    assert not judge_candidate("not_equal", "math-verify", "x^2")
    assert not judge_candidate("equal", "math-verify", NO_SOLUTION)
    assert not judge_candidate("parse_error", "answer longer than max_answer_chars=1000; not parsed", NO_SOLUTION)
    assert not judge_candidate("parse_error", "empty reference", "")
