"""tools/bench_scale.py: its questions, completions and line parsing, and one tiny end-to-end run."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import GSM8K_TRAIN, REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_scale  # noqa: E402


def test_replicas_are_distinct_and_rewordings_are_near_duplicates():
    from distill.curate.dedup import DedupConfig, dedup_questions

    base = bench_scale.load_questions(GSM8K_TRAIN)[:300]
    qs = bench_scale.build_questions(base, 1200, dup_share=0.05)
    assert len({q["id"] for q in qs}) == 1200
    result = dedup_questions([q["id"] for q in qs], [q["problem"] for q in qs], DedupConfig())
    # Only the rewordings (about 5%) are duplicates; the context-prefixed copies are not.
    assert 0.03 * 1200 < len(result.dropped) < 0.07 * 1200


def test_completions_are_deterministic_and_end_in_a_boxed_answer():
    t = bench_scale.Teacher(mean_words=400, sigma=0.6, correct=0.5)
    a, words = t.completion("How many?", "72", 3)
    assert (a, words) == t.completion("How many?", "72", 3)
    assert a.startswith("<think>\n") and "</think>" in a and a.endswith("}$.")
    finals = [t.completion("How many?", "72", s)[0].rsplit("boxed{", 1)[1] for s in range(200)]
    assert 0.35 < sum(f.startswith("72}") for f in finals) / 200 < 0.65
    text, finish, tokens, known = bench_scale.respond(t, {"How many?": "72"}, "How many?", 3, max_tokens=50)
    assert (finish, tokens, known) == ("length", 50, True) and "boxed" not in text


def test_stage_walls_from_timestamped_lines():
    lines = [(1.0, "source: 10 questions"), (5.0, "ray: embedded"), (6.0, "generate: 10 questions x 4"),
             (9.0, "generate: done."), (9.5, "verify: 5 partitions"), (12.0, "verify: 40 kept"),
             (13.0, "filter: 30 kept"), (20.0, "sft: 25 kept")]
    walls, start = bench_scale.stage_walls(lines)
    assert start == 5.0
    assert walls == {"generate": 4.0, "verify": 3.0, "filter": 1.0, "dedup": None, "decontam": None, "sft": 7.0}


@pytest.mark.slow
def test_tiny_run_reports_every_stage(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert bench_scale.main(["--sizes", "40", "--label", "t", "--mean-words", "200", "--out", str(out),
                             "--workdir", str(tmp_path / "w")]) == 0
    row = json.loads(out.read_text())
    assert row["size"] == 40 and row["kept"]["generate"] == 40 and row["teacher"]["unknown_prompts"] == 0
    assert all(row["stage_wall_s"][st] is not None for st in bench_scale.STAGES)
    assert row["driver_peak_rss_mib"] > 50 and row["ray_worker_peak_rss_mib"] > 50
    assert "| t | 40 |" in capsys.readouterr().out
