import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.store import MANIFEST, ShardRows, ShardStore, StaleOutputError, read_records

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


def test_shard_rows_stream_again_and_count_from_footers(tmp_path):
    s = make(tmp_path / "out")
    s.commit(0, [{"key": "a", "x": 1}], [{"key": "r", "reason": "bad: why"}])
    s.commit(1, [{"key": "b", "x": 2}, {"key": "c", "x": 3}])
    rows = ShardRows(tmp_path / "out", ["x"])
    assert len(rows) == 3
    assert list(rows) == list(rows) == [{"x": 1}, {"x": 2}, {"x": 3}]  # a second pass reads the files again
    assert [r["key"] for r in ShardRows(tmp_path / "out", rejected=True)] == ["r"]
    assert list(ShardRows(tmp_path / "missing")) == [] and len(ShardRows(tmp_path / "missing")) == 0


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
import pyarrow.parquet as pq
import distill.store as store
root, mode = sys.argv[1], sys.argv[2]

def stop_here(what):
    # Tell the parent where this process is, then wait to be killed there.
    print(what, flush=True)
    time.sleep(120)
    raise SystemExit("not killed")

real_replace, real_write = os.replace, pq.write_table
if mode == "pause-before-rename":   # between the finished temp write and its rename
    def replace(src, dst):
        if str(dst).endswith("part-00001.parquet") and "rejected" not in str(dst):
            stop_here("renaming")
        real_replace(src, dst)
    store.os.replace = replace
if mode == "between-renames":   # shard 1's rejected file renamed into place, the shard not yet
    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(os.path.join("rejected", "part-00001.parquet")):
            stop_here("rejected renamed")
    store.os.replace = replace
if mode == "mid-write":   # shard 1's temp file half written: one row group on disk, no footer
    def write_table(table, where, **kw):
        if "x" not in table.column_names or not os.path.basename(str(where)).startswith("part-00001.parquet."):
            return real_write(table, where, **kw)
        with open(where, "wb") as f:
            writer = pq.ParquetWriter(f, table.schema)  # kept open: closing it writes the footer
            writer.write_table(table.slice(0, len(table) // 2))
            f.flush()   # the first half in the file (the page cache survives a SIGKILL)
            stop_here(f"mid-write {os.path.getsize(where)}")
    store.pq.write_table = write_table
s = store.ShardStore(root, stage="t", fingerprint="f1", settings={},
                     schema=pa.schema([("key", pa.string()), ("x", pa.int64())]),
                     rejected_schema=pa.schema([("key", pa.string()), ("reason", pa.string())])).open()
s.commit(0, [{"key": "k0", "x": 0}])
print("ready", flush=True)
s.commit(1, [{"key": f"k1-{j}", "x": j} for j in range(200_000)], [{"key": "r1", "reason": "x"}])
print("committed", flush=True)
time.sleep(120)
"""


def _run_and_kill(root, mode, wait_for):
    """Start the writer, read its lines up to the point `mode` stops it at, and kill it there.
    Returns the last line: the writer said where it was before the kill."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), mode], stdout=subprocess.PIPE, text=True)
    try:
        for expected in wait_for:
            line = proc.stdout.readline().strip()
            assert line.startswith(expected), (expected, line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed where it stood, not exited
    return line


def _check_consistent(root, shards):
    assert sorted(p.name for p in root.glob("part-*.parquet")) == shards
    # Shard 0 holds one record, shard 1 200,000 (reading raises on a truncated file).
    assert [pq.read_table(root / part).num_rows for part in shards] == [1, 200_000][: len(shards)]
    s = make(root, "f1", {})
    assert not (root / ".tmp").exists()
    assert sorted(p.name for p in (root / "rejected").glob("*.parquet")) == shards[1:]
    assert len(s.done_keys()) == 1 + (len(shards) - 1) * 200_001


def test_killed_writer_leaves_no_partial_shard(tmp_path):
    root = tmp_path / "paused"
    _run_and_kill(root, "pause-before-rename", ["ready", "renaming"])
    assert list((root / ".tmp").iterdir()), "the shard was fully written to .tmp and never renamed"
    assert not (root / "part-00001.parquet").exists()
    _check_consistent(root, ["part-00000.parquet"])
    assert make(root, "f1", {}).done_keys() == {"k0"}


def test_writer_killed_mid_write_leaves_only_a_temp_file(tmp_path):
    root = tmp_path / "mid"
    line = _run_and_kill(root, "mid-write", ["ready", "mid-write"])
    # The kill landed inside the write: a partial temp file (bytes on disk, no footer) exists.
    # (Its rejected twin is staged first, in full, beside it.)
    (tmp,) = [p for p in (root / ".tmp").iterdir() if p.name.startswith("part-00001.parquet.")]
    assert os.path.getsize(tmp) == int(line.split()[-1]) > 0
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(tmp)
    _check_consistent(root, ["part-00000.parquet"])


def test_writer_killed_between_the_two_renames_drops_the_orphan(tmp_path):
    root = tmp_path / "between"
    _run_and_kill(root, "between-renames", ["ready", "rejected renamed"])
    assert (root / "rejected" / "part-00001.parquet").exists() and not (root / "part-00001.parquet").exists()
    _check_consistent(root, ["part-00000.parquet"])
    assert make(root, "f1", {}).done_keys() == {"k0"}


def test_writer_that_finished_is_consistent_too(tmp_path):
    root = tmp_path / "done"
    _run_and_kill(root, "plain", ["ready", "committed"])
    _check_consistent(root, ["part-00000.parquet", "part-00001.parquet"])
