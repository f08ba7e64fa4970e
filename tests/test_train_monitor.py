"""Straggler detection, the hang timeout and watchdog, goodput accounting and fault specs:
pure logic (plus one short subprocess for the watchdog), no process group, no model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO
from distill.train.faults import Fault, FaultSpecError, parse_fault
from distill.train.monitor import (HANG_EXIT_CODE, StragglerDetector, goodput, hang_timeout,
                                   straggler_threshold)


def _detector(world=4, window=5, windows=2, ratio=1.5, mad_k=5.0):
    return StragglerDetector(world, window, windows, ratio, mad_k)


def _feed(det, times_per_step):
    flags = []
    for step, row in enumerate(times_per_step, start=1):
        flags += det.add(step, row)
    return flags


def test_slow_rank_is_flagged_after_the_configured_windows():
    rng = np.random.default_rng(0)
    det = _detector(world=4, window=5, windows=2)
    rows = [list(1.0 + 0.05 * rng.standard_normal(4)) for _ in range(20)]
    for row in rows:
        row[2] *= 2.0
    flags = _feed(det, rows)
    assert [(f.rank, f.step, f.windows) for f in flags] == [(2, 10, 2)]  # two windows of 5, flagged once
    assert flags[0].ratio == pytest.approx(2.0, rel=0.1)
    assert det.last_ratios[2] == pytest.approx(2.0, rel=0.1) and max(det.last_ratios[:2]) < 1.2


def test_noise_and_a_single_slow_window_flag_nothing():
    rng = np.random.default_rng(1)
    det = _detector(world=8, window=5, windows=2)
    rows = [list(1.0 + 0.1 * rng.standard_normal(8)) for _ in range(40)]
    for step in range(10, 15):  # one slow window for rank 3, then it recovers
        rows[step][3] = 3.0
    # Single-step spikes inside a window leave its median alone.
    rows[22][5] = rows[31][6] = 50.0
    assert _feed(det, rows) == []


def test_mad_margin_raises_the_bar_when_ranks_spread_widely():
    tight = [1.0, 1.0, 1.0, 1.0]
    wide = [0.6, 0.8, 1.0, 1.2, 1.4]
    assert straggler_threshold(tight, ratio=1.5, mad_k=5) == pytest.approx(1.5)
    # MAD of `wide` is 0.2: 1.0 + 5 * 1.4826 * 0.2 = 2.48 > 1.5
    assert straggler_threshold(wide, ratio=1.5, mad_k=5) == pytest.approx(1.0 + 5 * 1.4826 * 0.2)


def test_two_ranks_compare_with_each_other():
    det = _detector(world=2, window=3, windows=1)
    assert [f.rank for f in _feed(det, [[1.0, 2.1]] * 3)] == [1]


def test_hang_timeout_is_configured_first_step_or_derived():
    assert hang_timeout(7.0, [100.0], min_s=60, factor=10, first_step_s=900) == 7.0
    assert hang_timeout(None, [], min_s=60, factor=10, first_step_s=900) == 900
    assert hang_timeout(None, [1.0, 2.0, 100.0], min_s=5, factor=10, first_step_s=900) == pytest.approx(20.0)
    assert hang_timeout(None, [0.1, 0.2], min_s=60, factor=10, first_step_s=900) == 60


def test_watchdog_dumps_the_stuck_frame_and_ends_the_process(tmp_path):
    """A real thread and a real process exit: the dump names the function the main thread is
    stuck in, and the status says hang."""
    dump = tmp_path / "attempt-0" / "rank-0.txt"
    script = textwrap.dedent(f"""
        import time
        from distill.train.monitor import HangWatchdog

        def stuck_in_here():
            time.sleep(60)

        dog = HangWatchdog({str(dump)!r}, header="rank 0 (test)", grace_s=0.0,
                           on_hang=lambda m: print("cause:", m, flush=True))
        dog.arm(step=3, timeout_s=0.5)
        stuck_in_here()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == HANG_EXIT_CODE, proc.stderr
    assert "cause: hang: step 3 made no progress" in proc.stdout
    text = dump.read_text()
    assert text.startswith("rank 0 (test)\nhang: step 3")
    assert "in stuck_in_here" in text


def test_disarmed_watchdog_does_not_fire(tmp_path):
    from distill.train.monitor import HangWatchdog

    fired = []
    dog = HangWatchdog(tmp_path / "d.txt", header="h", grace_s=0.0, exit=fired.append, poll_s=0.01)
    dog.arm(step=1, timeout_s=0.2)
    dog.disarm()
    import time

    time.sleep(0.5)
    dog.close()
    assert fired == [] and not (tmp_path / "d.txt").exists()


def test_a_guarded_phase_is_named_in_the_dump_and_the_cause(tmp_path):
    """Start-up and checkpoint writes are watched like steps, with their own timeout and name."""
    import time

    from distill.train.monitor import HangWatchdog

    fired, causes = [], []
    dog = HangWatchdog(tmp_path / "d.txt", header="rank 1", on_hang=causes.append, grace_s=0.0, exit=fired.append,
                       poll_s=0.01)
    dog.arm(0, 0.2, "checkpoint write after step 4")
    deadline = time.monotonic() + 10
    while not fired and time.monotonic() < deadline:
        time.sleep(0.02)
    dog.close()
    assert fired == [86] and causes and causes[0].startswith("hang: checkpoint write after step 4 made no progress")
    text = (tmp_path / "d.txt").read_text()
    assert "checkpoint write after step 4" in text and "test_a_guarded_phase_is_named" in text


def _rec(attempt, step, end, step_s=1.0):
    return {"attempt": attempt, "step": step, "time": end, "step_s": step_s, "rank": 0}


def test_goodput_counts_redone_steps_once_and_prices_each_failure():
    # Attempt 0 starts at t=10, steps 1-3 end at 12, 13, 14; checkpoint at 2; dies after step 3.
    # Attempt 1 starts at 30 from step 2, steps 3-4 end at 35, 36; dies; nothing new kept.
    # Attempt 2 starts at 50 from step 4, steps 5-6 end at 56, 57.
    starts = [{"attempt": 0, "started": 10.0, "resumed_from_step": 0},
              {"attempt": 1, "started": 30.0, "resumed_from_step": 2},
              {"attempt": 2, "started": 50.0, "resumed_from_step": 4}]
    steps = [_rec(0, 1, 12), _rec(0, 2, 13), _rec(0, 3, 14),
             _rec(1, 3, 35), _rec(1, 4, 36),
             _rec(2, 5, 56), _rec(2, 6, 57)]
    steps.append({**_rec(9, 7, 58)})  # another launch's attempt: ignored
    g = goodput(starts, {0: "injected kill", 1: "hang"}, steps, wall_s=50.0, now=60.0)
    assert g["productive_s"] == 6.0  # steps 1..6 once each; step 3's first run was thrown away
    assert g["goodput"] == pytest.approx(6.0 / 50.0)
    assert g["restarts"] == 2
    f0, f1 = g["failures"]
    assert (f0["cause"], f0["failed_at_step"], f0["resumed_from_step"]) == ("injected kill", 3, 2)
    assert f0["lost_s"] == pytest.approx(34 - 13)  # kept progress ended at 13, work resumed at 34
    assert f0["recover_s"] == pytest.approx(34 - 14)  # last sign of life 14
    assert (f1["cause"], f1["failed_at_step"], f1["resumed_from_step"]) == ("hang", 4, 4)
    assert f1["lost_s"] == pytest.approx(55 - 36) and f1["recover_s"] == pytest.approx(55 - 36)
    assert g["lost_s"] == pytest.approx(21 + 19)


def test_goodput_overlapping_failures_count_once_and_unknown_cause_is_said():
    # Attempt 1 dies during startup (no step): its lost interval lies inside attempt 0's.
    starts = [{"attempt": 0, "started": 0.0, "resumed_from_step": 0},
              {"attempt": 1, "started": 20.0, "resumed_from_step": 0},
              {"attempt": 2, "started": 40.0, "resumed_from_step": 0}]
    steps = [_rec(0, 1, 5), _rec(2, 1, 45)]
    g = goodput(starts, {}, steps, wall_s=50.0, now=50.0)
    assert [f["lost_s"] for f in g["failures"]] == [44.0, 24.0]
    assert g["lost_s"] == 44.0
    assert "unknown" in g["failures"][0]["cause"]
    assert g["failures"][1]["failed_at_step"] == 0


def test_fault_specs_parse_and_errors_say_what_is_wrong():
    assert parse_fault("kill:rank=1:step=5") == Fault("kill", rank=1, step=5)
    assert parse_fault("sleep:rank=1:factor=2.5") == Fault("sleep", rank=1, factor=2.5)
    assert parse_fault("hang:rank=0:step=4:attempt=*").attempt is None
    assert parse_fault("hang:rank=1:step=2:phase=checkpoint") == Fault("hang", rank=1, step=2, phase="checkpoint")
    assert parse_fault("kill:rank=1:step=2").phase == "step"
    for bad, needle in (("kil:rank=1", "unknown kind"), ("kill:rank=1", "step=N is required"),
                        ("sleep:factor=2", "rank=R is required"), ("kill:rank=x:step=1", "not a number"),
                        ("sleep:rank=0:factor=0.5", "factor must be >= 1"), ("kill:rank=0:when=3", "not one of"),
                        ("hang:rank=0:step=1:phase=save", "phase must be one of step, checkpoint"),
                        ("sleep:rank=0:phase=checkpoint", "only for kill, hang, raise")):
        with pytest.raises(FaultSpecError, match=needle):
            parse_fault(bad)


def test_config_rejects_bad_fault_specs_and_restart_without_off_ray():
    from pydantic import ValidationError

    from distill.train.config import TrainConfig

    with pytest.raises(ValidationError, match=r"train.fault.inject\[1\]"):
        TrainConfig(fault={"inject": ["kill:rank=0:step=2", "boom"]})
    with pytest.raises(ValidationError, match="restart_without needs train.launch.launcher=ray"):
        TrainConfig(launch={"launcher": "torchrun"}, fault={"straggler": {"policy": "restart_without"}})
    assert json.loads(TrainConfig().model_dump_json())["fault"]["max_failures"] == 3


def test_excluded_nodes_become_a_label_selector_ray_accepts():
    from ray._private.label_utils import validate_label_selector

    from distill.train.launch import excluded_nodes_selector

    ids = ["87ebc790691a5ce160a86845defcf20eeab1ab6ed33fef25cc990359",
           "03987871bf936c843e8db3950a362e7a2144307bb4b159696e6a2a0b"]
    assert excluded_nodes_selector([]) is None
    selector = excluded_nodes_selector(ids)
    assert selector == {"ray.io/node-id": f"!in({ids[0]},{ids[1]})"}
    assert validate_label_selector(selector) is None  # None: no error
