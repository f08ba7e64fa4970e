"""The hang watchdog beyond steps: a rank that blocks inside a checkpoint write (here: in a
collective its peers never join, while they wait in the save's barrier) is caught by
`train.fault.checkpoint_timeout_s`, dumps name the phase and the stuck frame, torchrun restarts the
group from the last committed checkpoint, and the run ends with the uninterrupted run's losses.
(tiny llama, 2 ranks, gloo, DeepSpeed ZeRO-2, the project's torchrun launcher.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_probe import make_assets, make_job, read_losses

pytestmark = pytest.mark.slow
COMMON = {"schedule.total_steps": 6, "checkpoint.every_steps": 2, "max_steps": 6}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, gsm8k_train):
    return make_assets(tmp_path_factory.mktemp("hangphase"), gsm8k_train, rows=48)


def test_a_rank_hung_in_a_checkpoint_write_is_dumped_and_the_run_restarts(assets):
    from distill.train.launch import launch

    clean = make_job(assets, "clean", **COMMON)
    launch(clean)
    job = make_job(assets, "hung-save", **COMMON, **{
        "fault.max_failures": 1, "fault.checkpoint_timeout_s": 6.0,
        "fault.inject": ["hang:rank=1:step=4:phase=checkpoint"]})
    final = launch(job)
    assert final.name == "step-00000006"
    assert read_losses(job) == read_losses(clean)

    out = Path(job.out_dir)
    stuck = (out / "hang-dumps" / "attempt-0" / "rank-1.txt").read_text()
    assert "hang: checkpoint write after step 4 made no progress" in stuck
    assert "_block_in_collective" in stuck and "write_parts" in stuck  # the frame, inside the save
    waiting = (out / "hang-dumps" / "attempt-0" / "rank-0.txt").read_text()
    assert "checkpoint write after step 4" in waiting and "save_checkpoint" in waiting
    good = json.loads((out / "goodput.json").read_text())
    assert good["restarts"] == 1
    failure = good["failures"][0]
    assert failure["cause"].startswith("hang: checkpoint write after step 4")
    # Step 4's checkpoint never committed: the group restarted from step 2's.
    assert failure["resumed_from_step"] == 2
