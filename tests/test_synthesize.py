"""Stage `synthesize`: new questions from the seeds through the teacher engine.

Pure parts first (prompts, reply parsing with malformed replies, stable ids, persona-file
quarantine), then real runs on the fault server's deterministic synthesis replies: the number and
provenance of the questions, rejected replies with reasons, `validate` reading the synthesized
questions, a rerun that asks nothing, lost shards asked again exactly once, a changed method that
recomputes this stage and what follows, not the source, and `kill -9` of the driver mid-stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import distill_cmd
from distill.curate.synthesis import (
    METHODS, SYNTH_MARKER, PersonaConfig, PlanContext, ReplyError, SynthesizeConfig, build_graph, draw_personas,
    parse_concepts, parse_reply, persona_rows, plan_tasks, random_walk, read_personas, reply_record, skill_pairs,
)
from distill.fsio import iter_jsonl
from distill.store import Manifest, read_records
from distill.testing.fault_server import FaultServer, synthesis_reply

# Stages run in this process connect an embedded Ray; each test leaves none behind.
pytestmark = pytest.mark.usefixtures("ray_shutdown_after")

SEED = {"id": "s1", "problem": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "7",
        "source": "gsm8k"}


def _ctx(**kw) -> PlanContext:
    cfg = SynthesizeConfig(methods=["augment", "persona"], **kw)
    return PlanContext(cfg, {"augment": "ha", "persona": "hp"}, ["a nurse", "a baker", "a pilot"])


def test_every_method_name_is_registered_and_unknown_ones_are_refused():
    assert set(SynthesizeConfig.model_fields) >= set(METHODS)
    with pytest.raises(ValueError, match="unknown synthesis method"):
        SynthesizeConfig(methods=["augment", "evolve"])


def test_tasks_and_ids_are_fixed_by_method_seeds_variant_index_and_settings():
    tasks = list(plan_tasks([SEED], _ctx()))
    assert [(t.method, t.variant) for t in tasks][:4] == [("seed", "seed"), ("augment", "rephrase"),
                                                          ("augment", "numbers"), ("augment", "harder")]
    assert len(tasks) == 5 and tasks[4].method == "persona" and tasks[4].persona in {"a nurse", "a baker", "a pilot"}
    again = list(plan_tasks([SEED], _ctx()))
    assert [(t.key, t.id, t.seed, t.persona) for t in tasks] == [(t.key, t.id, t.seed, t.persona) for t in again]
    assert len({t.id for t in tasks}) == 5
    # Another settings hash: new ids for that method only.
    other = PlanContext(_ctx().cfg, {"augment": "ha", "persona": "changed"}, _ctx().personas)
    moved = {t.id for t in plan_tasks([SEED], other)} ^ {t.id for t in tasks}
    assert len(moved) == 2  # the old and the new persona question
    # Two of each rewrite: each its own id and seed (the index is part of the key).
    two = [t for t in plan_tasks([SEED], _ctx(augment={"per_seed": 2})) if t.method == "augment"]
    assert len(two) == 6 and len({t.id for t in two}) == 6 and len({t.seed for t in two}) == 6
    # More personas per seed: distinct personas while the list lasts.
    many = list(plan_tasks([SEED], _ctx(persona=PersonaConfig(per_seed=3))))
    assert sorted(t.persona for t in many if t.method == "persona") == ["a baker", "a nurse", "a pilot"]


def test_persona_draws_are_fixed_by_seed_and_question_and_repeat_only_when_the_list_runs_out():
    for n, size in ((1, 30), (5, 200_000), (15, 30), (20, 30), (30, 30)):  # (15, 30): hashed draws that collide
        draw = draw_personas("q1", n, size, 0)
        assert draw == draw_personas("q1", n, size, 0) and len(set(draw)) == n and all(0 <= j < size for j in draw)
    assert sorted(draw_personas("q1", 5, 3, 0)[:3]) == [0, 1, 2]
    assert len({tuple(draw_personas(f"q{i}", 2, 30, 0)) for i in range(50)}) > 40  # seeds differ


def test_prompts_open_with_the_marker_and_carry_the_seed_and_persona():
    tasks = list(plan_tasks([SEED], _ctx()))
    for t in tasks[1:]:
        text = METHODS[t.method].messages(t)[0]["content"]
        assert text.startswith(SYNTH_MARKER + "\n") and SEED["problem"] in text and "QUESTION:" in text
    assert tasks[4].persona in METHODS["persona"].messages(tasks[4])[0]["content"]
    assert "different numbers" in METHODS["augment"].messages(tasks[2])[0]["content"]


@pytest.mark.parametrize("reply, finish, expected", [
    ("QUESTION: What is 2 + 5?\nANSWER: 7.", "stop", ("What is 2 + 5?", "7")),
    ("<think>hmm</think>\n**Question:** A train goes\n60 km in 1 h. How fast?\n**Answer:** 60 km/h", "stop",
     ("A train goes\n60 km in 1 h. How fast?", "60 km/h")),
    ("QUESTION: What is 2 + 5?", "stop", ("What is 2 + 5?", None)),
    ("Sure! Here is a new problem about apples.", "stop", "no_question"),
    ("QUESTION:\nANSWER: 3", "stop", "no_question"),
    ("QUESTION: a?\nQUESTION: b?\nANSWER: 1", "stop", "unparsable"),
    ("QUESTION: What is 2 + 5? And then", "length", "truncated"),
    ("<think>I will write a problem about", "length", "truncated"),
    ("", "stop", "no_question"),
])
def test_replies_are_parsed_or_rejected_with_their_reason(reply, finish, expected):
    if isinstance(expected, tuple):
        assert parse_reply(reply, finish) == expected
    else:
        with pytest.raises(ReplyError, match=f"^{expected}: "):
            parse_reply(reply, finish)


def test_reply_records_keep_provenance_and_the_rephrase_keeps_its_seed_answer():
    rephrase, numbers = list(plan_tasks([SEED], _ctx()))[1:3]
    row, why = reply_record(rephrase, "QUESTION: Tom had 3 apples, then got 4. How many now?\nANSWER: 7", "stop",
                            "openai:t", teacher_answers=False)
    assert why is None and row["answer"] == "7" and row["seed_ids"] == ["s1"] and row["teacher"] == "openai:t"
    assert row["id"] == rephrase.id and row["method"] == "augment" and row["variant"] == "rephrase"
    row, why = reply_record(numbers, "QUESTION: Tom has 5 apples and buys 9 more. How many?\nANSWER: 14", "stop",
                            "openai:t", teacher_answers=False)
    assert why is None and row["answer"] is None and row["teacher_answer"] == "14"
    row, why = reply_record(numbers, f"QUESTION: {SEED['problem']}\nANSWER: 7", "stop", "openai:t", False)
    assert why.startswith("same_as_seed:") and row["reply"].startswith("QUESTION:")
    row, why = reply_record(numbers, "no idea", "stop", "openai:t", False)
    assert why.startswith("no_question:") and row["reply"] == "no idea" and row["problem"] is None


def test_the_shipped_personas_read_clean_and_a_malformed_file_is_quarantined_line_by_line(tmp_path):
    personas, bad = read_personas(persona_rows(PersonaConfig()), "persona")
    assert len(personas) == 30 and bad == []
    path = tmp_path / "p.jsonl"
    path.write_text('{"persona": "a nurse"}\n{"persona": \n["a list"]\n{"name": "x"}\n{"persona": 3}\n'
                    '{"persona": "  "}\n{"persona": "a  nurse"}\n\n{"persona": "a pilot"}\n')
    personas, bad = read_personas(iter_jsonl(path), "persona")
    assert personas == ["a nurse", "a pilot"]
    assert [(b["location"].rsplit(":", 1)[1], b["reason"].split(":")[0]) for b in bad] == [
        ("2", "invalid_json"), ("3", "not_an_object"), ("4", "missing_persona"), ("5", "bad_type"),
        ("6", "empty_persona"), ("7", "duplicate_persona")]
    with pytest.raises(FileNotFoundError, match="persona.path"):
        persona_rows(PersonaConfig(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(FileNotFoundError, match="persona.path: could not load Hub dataset"):  # offline in tests
        persona_rows(PersonaConfig(path="no-such-org/no-such-personas"))


@pytest.mark.parametrize("reply, expected", [
    ('{"topics": ["Algebra", "algebra "], "knowledge_points": ["Linear  equations"]}',
     (["algebra"], ["linear equations"])),
    ('<think>hm</think>```json\n{"topics": ["geometry"]}\n```', (["geometry"], [])),
    ("Topics: algebra", "unparsable"),
    ('["algebra"]', "unparsable"),
    ('{"topics": "algebra"}', "unparsable"),
    ('{"topics": [], "knowledge_points": []}', "no_concepts"),
])
def test_concept_lists_are_parsed_or_rejected_with_their_reason(reply, expected):
    if isinstance(expected, tuple):
        assert parse_concepts(reply) == expected
    else:
        with pytest.raises(ReplyError, match=f"^{expected}: "):
            parse_concepts(reply)


def _graph():
    seeds = [{"id": f"s{i}", "problem": f"P{i}", "answer": "1", "source": "x"} for i in range(5)]
    return build_graph([(seeds[0], ["algebra"], ["fractions", "ratios"]), (seeds[1], ["algebra"], ["ratios", "lines"]),
                        (seeds[2], ["geometry"], ["area"]), (seeds[3], ["geometry"], ["area", "angles"]),
                        (seeds[4], ["algebra"], ["fractions"])])


def test_the_concept_graph_links_co_occurring_concepts_and_walks_stay_connected():
    g = _graph()
    idx = {c: i for i, c in enumerate(g.nodes)}
    assert g.counts[idx["algebra"]] == 3 and g.edges[idx["algebra"]][idx["fractions"]] == 2
    assert idx["geometry"] not in g.edges[idx["algebra"]]
    assert {g.nodes[i] for i in g.skills} == {"fractions", "ratios", "lines", "area", "angles"}
    algebra = {"algebra", "fractions", "ratios", "lines"}
    for i in range(30):
        walk = [g.nodes[n] for n in random_walk(g, 3, 0, i)]
        assert walk == [g.nodes[n] for n in random_walk(g, 3, 0, i)] and len(set(walk)) == len(walk)
        assert set(walk) <= algebra or set(walk) <= {"geometry", "area", "angles"}  # never across components
        assert len(walk) == 3
    pairs = skill_pairs(g, 100, 1, 0)
    assert len(pairs) == 10 and len(set(pairs)) == 10 and all(a in g.skills and b in g.skills for a, b in pairs)
    assert {frozenset((g.nodes[a], g.nodes[b])) for a, b in skill_pairs(g, 100, 2, 0)} == {
        frozenset(("fractions", "ratios")), frozenset(("fractions", "area")), frozenset(("ratios", "area"))}
    ctx = PlanContext(SynthesizeConfig(methods=["concept_graph", "skill_pair"], keep_seeds=False,
                                       concept_graph={"questions": 4}, skill_pair={"questions": 3}),
                      {"concept_graph": "hc", "skill_pair": "hs"}, graph=g)
    tasks = list(plan_tasks([], ctx))
    assert Counter(t.method for t in tasks) == {"concept_graph": 4, "skill_pair": 3}
    for t in tasks:  # the seeds recorded are ones that need the concepts, shown as examples
        text = METHODS[t.method].messages(t)[0]["content"]
        assert all(c in text for c in t.concepts) and all(q["problem"] in text for q in t.seeds[:2])


def test_the_fault_server_answers_synthesis_prompts_in_format_and_sometimes_not():
    outcomes = Counter()
    for i in range(400):
        try:
            parse_reply(synthesis_reply(f"{SYNTH_MARKER}\nprompt {i}", 1))
            outcomes["ok"] += 1
        except ReplyError as e:
            outcomes[str(e).split(":")[0]] += 1
    assert outcomes["ok"] > 300 and outcomes["no_question"] > 10 and outcomes["unparsable"] > 5


# --------------------------------------------------------------------------- real runs


def _config(tmp_path: Path, server: FaultServer, seeds: Path, personas: Path, **synth) -> dict:
    return {
        "run": {"dir": str(tmp_path / "run"), "stages": ["synthesize", "validate"], "progress": False},
        "ray": {"num_cpus": 2}, "source": {"path": str(seeds)}, "curate": {"workers": 1},
        "questions": {"synthesize": {"methods": ["augment", "persona", "concept_graph", "skill_pair"],
                                     "shard_size": 8, "augment": {"kinds": ["rephrase", "numbers"]},
                                     "concept_graph": {"questions": 6}, "skill_pair": {"questions": 4},
                                     "persona": {"path": str(personas), "max_bad_fraction": 0.5}, **synth}},
        "generate": {"engine": "openai", "replicas": 1, "cpus_per_replica": 0.5,
                     "openai": {"base_url": server.base_url, "model": "teacher", "concurrency": 8}}}


def _inputs(tmp_path: Path, gsm8k_train: Path, n: int) -> tuple[list[dict], Path, Path]:
    rows = [json.loads(line) for line in gsm8k_train.open().readlines()[:n]]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({k: r[k] for k in ("id", "problem", "answer")}) + "\n" for r in rows))
    personas = tmp_path / "personas.jsonl"
    personas.write_text('{"persona": "a nurse on night shifts"}\n{"persona": "a baker"}\nnot json\n'
                        '{"persona": "a pilot"}\n{"who": "x"}\n{"persona": "a farmer"}\n')
    return rows, seeds, personas


@pytest.mark.slow
def test_synthesize_then_validate_on_the_fault_server(tmp_path, gsm8k_train):
    from distill.config import build_config
    from distill.pipeline import run_pipeline

    rows, seeds, personas = _inputs(tmp_path, gsm8k_train, 20)
    run = tmp_path / "run"
    with FaultServer() as server:
        tree = _config(tmp_path, server, seeds, personas)
        run_pipeline(build_config(tree))
        asked = sum(server.completions.values())
        seed_by_id = {r["id"]: r for r in rows}
        kept, rejected = read_records(run / "synthesize"), read_records(run / "synthesize", rejected=True)

        # 20 seeds through; asked once each: 20 x (2 augment + 1 persona), 20 concept lists, 6 walks
        # and 4 skill pairs.
        assert asked == 60 + 20 + 6 + 4 and set(server.completions.values()) == {1}
        assert Counter(r["method"] for r in kept)["seed"] == 20
        synth = [r for r in kept if r["method"] != "seed"]
        failed = [r for r in rejected if r["location"] is None and r["method"] != "concepts"]
        assert len(synth) + len(failed) == 70 and len(failed) >= 3, Counter(r["reason"] for r in failed)
        graph = [r for r in synth + failed if r["method"] in ("concept_graph", "skill_pair")]
        assert Counter(r["method"] for r in graph) == {"concept_graph": 6, "skill_pair": 4}
        for r in graph:  # concepts as the server listed them, seeds that need them
            assert len(r["concepts"]) == (2 if r["method"] == "skill_pair" else 3) and r["seed_ids"]
            assert set(r["seed_ids"]) <= set(seed_by_id) and r["persona"] is None
        concepts = read_records(run / "synthesize" / "concepts")
        bad_lists = read_records(run / "synthesize" / "concepts", rejected=True)
        assert len(concepts) + len(bad_lists) == 20 and len(bad_lists) >= 2
        assert all(r["knowledge_points"] for r in concepts)
        assert {r["reason"].split(":")[0] for r in bad_lists} <= {"unparsable", "no_concepts"}
        # ... and counted in the stage's own rejected rows (the report's funnel), with their reasons.
        assert sorted((r["seed_ids"][0], r["reason"]) for r in rejected if r["method"] == "concepts") == sorted(
            (r["id"], r["reason"]) for r in bad_lists)
        for r in synth:
            assert r["problem"].startswith("Shop number") and r["teacher"] == "openai:teacher" and r["params_hash"]
            assert r["id"].startswith("syn-")
            if r["method"] in ("augment", "persona"):
                assert len(r["seed_ids"]) == 1 and r["seed_ids"][0] in seed_by_id
            assert (r["persona"] is not None) == (r["method"] == "persona")
            if r["variant"] == "rephrase":
                assert r["answer"] == seed_by_id[r["seed_ids"][0]]["answer"]
            else:
                assert r["answer"] is None and r["teacher_answer"]
        assert {r["persona"] for r in synth if r["persona"]} <= {"a nurse on night shifts", "a baker", "a pilot",
                                                                 "a farmer"}
        for r in failed:  # each rejection is what parsing that very reply says
            with pytest.raises(ReplyError) as e:
                parse_reply(r["reply"])
            assert r["reason"] == str(e.value) and r["reason"].split(":")[0] in {"no_question", "unparsable"}
        quarantined = sorted((r["location"].rsplit(":", 1)[1], r["reason"].split(":")[0]) for r in rejected
                             if r["location"])
        assert quarantined == [("3", "invalid_json"), ("5", "missing_persona")]
        assert len({r["id"] for r in kept}) == len(kept)

        # validate read the synthesized questions and kept their provenance.
        validated = read_records(run / "validate") + read_records(run / "validate", rejected=True)
        assert sorted(r["id"] for r in validated) == sorted(r["id"] for r in kept)
        assert {r["method"] for r in validated} == {"seed", "augment", "persona", "concept_graph", "skill_pair"}
        # The report follows each method's questions through the question stages.
        from distill.report import build_report

        by_method = build_report(run)["synthesized_yield"]
        assert by_method == {m: {"synthesize": sum(r["method"] == m for r in kept),
                                 "validate": sum(r["method"] == m for r in read_records(run / "validate"))}
                             for m in {r["method"] for r in kept}}

        # Two committed shards lost (as if never committed): the rerun asks exactly their tasks again.
        lost = sorted((run / "synthesize").glob("part-*.parquet"))[-2:]
        twins = [run / "synthesize" / "rejected" / p.name for p in lost]
        lost_rows = [r for p in lost + [t for t in twins if t.exists()] for r in pq.read_table(p).to_pylist()]
        for p in lost + twins:
            p.unlink(missing_ok=True)
        run_pipeline(build_config(tree))
        assert sum(server.completions.values()) == asked + sum(r["method"] != "seed" for r in lost_rows)
        redo = read_records(run / "synthesize") + read_records(run / "synthesize", rejected=True)
        assert Counter(r["key"] for r in redo) == Counter(r["key"] for r in kept + rejected)
        asked = sum(server.completions.values())

        # The same config again asks nothing; a changed method recomputes synthesize and validate,
        # not the source.
        source_fp = Manifest.read(run / "source").fingerprint
        source_mtime = (run / "source" / "part-00000.parquet").stat().st_mtime
        run_pipeline(build_config(tree))
        assert sum(server.completions.values()) == asked
        tree["questions"]["synthesize"]["augment"]["kinds"] = ["harder"]
        tree["questions"]["synthesize"]["skill_pair"]["questions"] = 3
        run_pipeline(build_config(tree))
        # The whole stage is recomputed: 20 harder variants instead of 40 rewrites, 3 pairs instead
        # of 4, and everything else asked again (persona questions, concept lists, walks).
        assert sum(server.completions.values()) == asked + 90 - 20 - 1
        again = read_records(run / "synthesize")
        assert {r["variant"] for r in again if r["method"] == "augment"} == {"harder"}
        # Persona questions keep their ids (their method's settings did not change), so `generate`
        # reuses their answers when the teacher is deterministic.
        assert {r["id"] for r in again if r["method"] == "persona"} == {r["id"] for r in kept if r["method"] == "persona"}
        assert sorted(r["id"] for r in read_records(run / "validate") + read_records(run / "validate", rejected=True)) \
            == sorted(r["id"] for r in again)
        assert Manifest.read(run / "source").fingerprint == source_fp
        assert (run / "source" / "part-00000.parquet").stat().st_mtime == source_mtime

        # No method (the default): the seeds pass through and the teacher is asked nothing.
        asked = sum(server.completions.values())
        tree["run"]["dir"] = str(tmp_path / "bare")
        tree["questions"]["synthesize"] = {}
        run_pipeline(build_config(tree))
        assert sum(server.completions.values()) == asked
        assert sorted(r["id"] for r in read_records(tmp_path / "bare" / "synthesize")) == sorted(seed_by_id)


@pytest.mark.slow
def test_kill_9_of_the_driver_then_resume_makes_each_question_once(tmp_path, gsm8k_train):
    """The driver is killed mid-stage; the resumed run (in this process, whose Ray is usually up
    already: one Ray start-up fewer) asks only what was not committed."""
    from distill.config import build_config
    from distill.pipeline import run_pipeline

    rows, seeds, personas = _inputs(tmp_path, gsm8k_train, 24)
    with FaultServer(latency_s=0.1) as server:
        tree = _config(tmp_path, server, seeds, personas, shard_size=4, methods=["augment", "persona"])
        tree["run"]["stages"] = ["synthesize"]
        tree["generate"]["openai"]["concurrency"] = 2
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(tree))
        synth_dir = tmp_path / "run" / "synthesize"
        driver = subprocess.Popen(distill_cmd("run", str(cfg)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while len(list(synth_dir.glob("part-*.parquet"))) < 5:
                assert driver.poll() is None, driver.stdout.read()
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.05)
        finally:
            os.kill(driver.pid, signal.SIGKILL)  # the driver only: Ray's own processes must cope
            driver.wait()
        committed = len(list(synth_dir.glob("part-*.parquet")))
        # 1 quarantine shard + (24 seeds + 72 questions) / 4 = 25 shards in all.
        assert 5 <= committed < 25 and Manifest.read(synth_dir).status == "running"
        before = sum(server.completions.values())
        run_pipeline(build_config(tree))
        # A unit is one seed's 4 tasks (3 asked): the rerun asks exactly the uncommitted ones. Up to
        # the 2 units the dead driver had queued on its replica may still be answered meanwhile
        # (Ray's processes outlive a killed driver for a moment), never committed.
        todo = 72 - (committed - 1) * 3
        assert todo <= sum(server.completions.values()) - before <= todo + 6
    kept, rejected = read_records(synth_dir), read_records(synth_dir, rejected=True)
    keys = Counter(r["key"] for r in kept + rejected)
    assert set(keys.values()) == {1} and len(keys) == 24 + 72 + 2
    assert Manifest.read(synth_dir).status == "complete"
