import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.store import MANIFEST, ShardStore, StaleOutputError, read_records

SCHEMA = pa.schema([("key", pa.string()), ("x", pa.int64())])
REJ = pa.schema([("key", pa.string()), ("reason", pa.string())])


def make(root, fp="f1", settings=None):
    return ShardStore(root, stage="t", fingerprint=fp, settings=settings or {"a": 1}, schema=SCHEMA,
                      rejected_schema=REJ).open()


def test_commit_read_and_counts(tmp_path):
    s = make(tmp_path / "out")
    s.commit(0, [{"key": "a", "x": 1}, {"key": "b", "x": 2}], [{"key": "c", "reason": "too_long: 9 > 8"}])
    s.commit(1, [{"key": "d", "x": 3}])
    assert s.done_keys() == {"a", "b", "c", "d"}
    assert s.next_index() == 2
    m = s.finish()
    assert m.counts == {"shards": 2, "records": 3, "rejected": 1, "rejected_by_reason": {"too_long": 1}}
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["status"] == "complete"
    assert [r["x"] for r in read_records(tmp_path / "out")] == [1, 2, 3]
    with pytest.raises(FileExistsError):
        s.commit(1, [{"key": "e", "x": 4}])


def test_changed_settings_are_refused_with_a_diff(tmp_path):
    s = make(tmp_path / "out", "f1", {"sampling": {"temperature": 0.7}})
    s.commit(0, [{"key": "a", "x": 1}])
    with pytest.raises(StaleOutputError) as e:
        make(tmp_path / "out", "f2", {"sampling": {"temperature": 0.9}})
    msg = str(e.value)
    assert "sampling.temperature: 0.7 -> 0.9" in msg and "run.dir=" in msg and "delete" in msg
    # the same settings reopen fine and keep the data
    assert make(tmp_path / "out", "f1", {"sampling": {"temperature": 0.7}}).done_keys() == {"a"}


def test_orphan_rejected_file_is_dropped_on_open(tmp_path):
    s = make(tmp_path / "out")
    s.commit(0, [{"key": "a", "x": 1}], [{"key": "r0", "reason": "x"}])
    # simulate a crash between the two renames of shard 1: rejected committed, shard not
    pq.write_table(pa.Table.from_pylist([{"key": "r1", "reason": "x"}], schema=REJ),
                   tmp_path / "out" / "rejected" / "part-00001.parquet")
    s = make(tmp_path / "out")
    assert s.done_keys() == {"a", "r0"}


WRITER = """
import os, sys, time
import pyarrow as pa
import distill.store as store
root, mode = sys.argv[1], sys.argv[2]
if mode == "pause-before-rename":   # deterministic: stop between the temp write and the rename
    real_replace = os.replace
    def slow_replace(src, dst):
        if str(dst).endswith("part-00001.parquet"):
            print("renaming", flush=True)
            time.sleep(60)
        real_replace(src, dst)
    store.os.replace = slow_replace
s = store.ShardStore(root, stage="t", fingerprint="f1", settings={},
                     schema=pa.schema([("key", pa.string()), ("x", pa.int64())]),
                     rejected_schema=pa.schema([("key", pa.string()), ("reason", pa.string())])).open()
s.commit(0, [{"key": "k0", "x": 0}])
print("ready", flush=True)
i = 1
while True:   # keep writing big shards until killed
    s.commit(i, [{"key": f"k{i}-{j}", "x": j} for j in range(200_000)], [{"key": f"r{i}", "reason": "x"}])
    i += 1
"""


def _run_and_kill(root, mode, wait_for, delay):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), mode], stdout=subprocess.PIPE, text=True)
    try:
        for expected in wait_for:
            assert proc.stdout.readline().strip() == expected
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _check_consistent(root):
    parts = sorted(p.name for p in root.glob("part-*.parquet"))
    for part in parts:
        assert pq.read_table(root / part).num_rows in (1, 200_000)  # raises on a truncated file
    s = make(root, "f1", {})
    assert not (root / ".tmp").exists()
    assert sorted(p.name for p in (root / "rejected").glob("*.parquet")) == parts[1:]
    assert len(s.done_keys()) == 1 + (len(parts) - 1) * 200_001


def test_killed_writer_leaves_no_partial_shard(tmp_path):
    root = tmp_path / "paused"
    _run_and_kill(root, "pause-before-rename", ["ready", "renaming"], 0)
    assert list((root / ".tmp").iterdir()), "the shard was fully written to .tmp and never renamed"
    assert not (root / "part-00001.parquet").exists()
    _check_consistent(root)
    assert make(root, "f1", {}).done_keys() == {"k0"}


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_writer_killed_at_random_moments_stays_consistent(tmp_path, delay):
    root = tmp_path / "random"
    _run_and_kill(root, "plain", ["ready"], delay)
    _check_consistent(root)
