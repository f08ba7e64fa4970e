"""Sharded Parquet datasets with a manifest: the contract between stages.

A stage's output directory looks like

    generate/
      _manifest.json          stage, fingerprint of the settings that shape the output, the
                              settings themselves, input fingerprints, counts, status
      part-00000.parquet      committed shards (written as .tmp/…, fsynced, then renamed)
      part-00001.parquet
      rejected/part-00001.parquet   records the stage refused, with a `reason` column
      .tmp/                   shards being written; anything here after a crash is garbage

The rename of `part-N.parquet` is the commit point of shard N. Its rejected twin is renamed
first, so a crash between the two renames leaves an orphan rejected file, which `open()`
deletes: a shard's accepted and rejected records are committed together or not at all.
Which work is done is read from the shards themselves (their `key` column), never from the
manifest, so a `kill -9` at any moment loses at most the shards in flight and duplicates
nothing. Everything loads with `datasets.load_dataset("parquet", data_dir=...)`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.fsio import atomic_write_text, fsync_file, rename_into_place

MANIFEST = "_manifest.json"
REJECTED = "rejected"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


def reason_code(reason: str) -> str:
    """Rejection reasons are written "code: detail"; counts and funnels group by the code."""
    return reason.split(":", 1)[0].strip()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int:
    return int(_PART.match(name).group(1))


def partition_of(ids: Iterable[str], n: int) -> np.ndarray:
    """The partition (0..n-1) of each question id: a stable hash, the same in every process and
    Python version (no `hash()` randomisation), so a question's samples meet in one partition
    whatever the shard layout they come from. ~1 s per million ids."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") % n
                        for i in ids), dtype=np.int64)


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class KeyHashes:
    """A set of keys held as sorted 64-bit hashes, each with an optional 64-bit value: 8 bytes a
    key (16 with values) instead of ~100 for a `str` in a `set`, so a million done samples cost
    8 MB in the driver. A key wrongly reported present needs a hash collision: about n^2 / 2^65,
    3e-8 for a million keys. One home for this trick: done keys (generate), the source's problems
    by id (generate's changed-question check), ids seen so far (ingest)."""

    def __init__(self, keys: Iterable[str] = ()):
        self._set(np.fromiter((key_hash(k) for k in keys), dtype=np.uint64), None)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, int]]) -> "KeyHashes":
        """Keys with a 64-bit unsigned value each, from one pass over (key, value) pairs."""
        flat = np.fromiter(itertools.chain.from_iterable((key_hash(k), v) for k, v in pairs),
                           dtype=np.uint64).reshape(-1, 2)
        index = cls()
        index._set(flat[:, 0].copy(), flat[:, 1].copy())
        return index

    def _set(self, hashes: np.ndarray, values: np.ndarray | None) -> None:
        order = np.argsort(hashes, kind="stable")
        self._h, self._v = hashes[order], (None if values is None else values[order])

    def __len__(self) -> int:
        return len(self._h)

    def _find(self, key: str) -> int | None:
        h = np.uint64(key_hash(key))
        i = int(np.searchsorted(self._h, h))
        return i if i < len(self._h) and self._h[i] == h else None

    def __contains__(self, key: str) -> bool:
        return self._find(key) is not None

    def get(self, key: str) -> int | None:
        """The value stored with `key`, or None when it is absent."""
        if self._v is None:
            raise TypeError("this KeyHashes holds keys only (build it with from_pairs or add_many)")
        i = self._find(key)
        return None if i is None else int(self._v[i])

    def add_many(self, hashes: Iterable[int], values: Iterable[int]) -> None:
        """Merge already-hashed keys with their values in (one sort: call it per batch, not per key)."""
        new_h = np.fromiter(hashes, dtype=np.uint64)
        new_v = np.fromiter(values, dtype=np.uint64, count=len(new_h))
        old_v = self._v if self._v is not None else np.empty(0, dtype=np.uint64)
        self._set(np.concatenate([self._h, new_h]), np.concatenate([old_v, new_v]))


class InputShardError(RuntimeError):
    """An input shard could not be read (missing, truncated, not Parquet); names the file."""


def read_shards(paths: Iterable[str | os.PathLike], columns: Iterable[str] | None = None) -> pa.Table | None:
    """The rows of several shards as one table (None for no paths); an unreadable one raises
    `InputShardError` naming it."""
    cols = list(columns) if columns is not None else None
    tables = []
    for p in paths:
        try:
            tables.append(pq.read_table(p, columns=cols))
        except (OSError, pa.ArrowException) as e:
            raise InputShardError(f"cannot read input shard {p}: {e}") from e
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


class MissingInputError(RuntimeError):
    """A stage's input is missing or unfinished; the message names the command to run."""


class StaleOutputError(RuntimeError):
    """The directory holds output made with settings that would make it wrong for this config."""


def diff_settings(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested settings dicts, by dotted key."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += diff_settings(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


@dataclass
class Manifest:
    stage: str
    fingerprint: str
    settings: dict
    inputs: dict[str, str] = field(default_factory=dict)
    status: str = "running"  # running | complete | failed
    partitions: int | None = None
    """Set when shard N holds exactly the questions of partition N (`partition_of`) of this many;
    None when shards are cut by arrival order (generate)."""
    counts: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    updated: float = 0.0

    @classmethod
    def read(cls, root: Path) -> "Manifest | None":
        path = root / MANIFEST
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    def write(self, root: Path) -> None:
        self.updated = time.time()
        atomic_write_text(root / MANIFEST, json.dumps(self.__dict__, indent=2, sort_keys=True, default=str))


class ShardStore:
    """One stage's output directory. Not safe for two writers at once: one driver owns it."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        stage: str,
        fingerprint: str,
        settings: dict,
        schema: pa.Schema,
        rejected_schema: pa.Schema,
        inputs: dict[str, str] | None = None,
    ):
        self.root = Path(root)
        self.stage = stage
        self.schema = schema
        self.rejected_schema = rejected_schema
        self.manifest = Manifest(stage, fingerprint, settings, dict(inputs or {}))

    # ------------------------------------------------------------------ opening

    def open(self) -> "ShardStore":
        """Create the directory, or check that what is there was made with the same settings."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / REJECTED).mkdir(exist_ok=True)
        old = Manifest.read(self.root)
        if old is not None and old.fingerprint != self.manifest.fingerprint and self.shard_names():
            changes = diff_settings(old.settings, self.manifest.settings) or ["(settings hash differs)"]
            raise StaleOutputError(
                f"{self.root} holds {self.stage} output made with different settings:\n"
                + "".join(f"    {c}\n" for c in changes)
                + "  Its shards would be wrong for this config. To proceed, either revert the change,\n"
                f"  or write to a new run directory (run.dir=...), or delete {self.root} to redo the stage."
            )
        shutil.rmtree(self.root / ".tmp", ignore_errors=True)
        committed = set(self.shard_names())
        for orphan in (self.root / REJECTED).glob("part-*.parquet"):
            if orphan.name not in committed:
                orphan.unlink()
        self.manifest.status = "running"
        self.manifest.write(self.root)
        return self

    # ------------------------------------------------------------------ reading

    def shard_names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if _PART.match(p.name))

    def rejected_paths(self) -> list[Path]:
        return sorted((self.root / REJECTED).glob("part-*.parquet"))

    def read_columns(self, columns: tuple[str, ...], *, accepted: bool = True, rejected: bool = True) -> list[dict]:
        """Selected columns of committed records: accepted shards, rejected ones, or both."""
        paths = ([self.root / n for n in self.shard_names()] if accepted else []) + (self.rejected_paths() if rejected else [])
        return [row for p in paths for row in pq.read_table(p, columns=list(columns)).to_pylist()]

    def done_keys(self) -> set[str]:
        """Keys of every record committed so far, accepted or rejected."""
        return {r["key"] for r in self.read_columns(("key",))}

    def done_key_hashes(self) -> "KeyHashes":
        """`done_keys` at 8 bytes a key, read one shard's column at a time."""
        paths = [self.root / n for n in self.shard_names()] + self.rejected_paths()
        return KeyHashes(k for p in paths for k in pq.read_table(p, columns=["key"]).column(0).to_pylist())

    def next_index(self) -> int:
        names = self.shard_names()
        return int(_PART.match(names[-1]).group(1)) + 1 if names else 0

    # ------------------------------------------------------------------ writing

    def commit(self, index: int, records: list[dict], rejected: list[dict] = ()) -> str:
        """Commit shard `index` atomically: its rejected records first, then the shard."""
        return self.commit_staged(stage_shard(self.root, index, records, rejected, self.schema, self.rejected_schema))

    def commit_staged(self, staged: "StagedShard") -> str:
        """Commit a shard a worker wrote to `.tmp/` (`stage_shard`): rename its rejected twin, then
        the shard itself (the commit point), and make both renames durable. Only the driver calls
        this, once per shard: a retried unit's duplicate (a worker thought dead that finished
        anyway) stays an unrenamed temp file, deleted with `.tmp/`."""
        dest = self.root / staged.name
        if dest.exists():
            raise FileExistsError(f"{dest} is already committed")
        if staged.rejected_path:
            rename_into_place(staged.rejected_path, self.root / REJECTED / staged.name)
        rename_into_place(staged.path, dest)
        return staged.name

    def finish(self, summary: dict | None = None, status: str = "complete") -> Manifest:
        self.manifest.counts = self.counts()
        self.manifest.summary = summary or {}
        self.manifest.status = status
        self.manifest.write(self.root)
        shutil.rmtree(self.root / ".tmp", ignore_errors=True)
        return self.manifest

    def counts(self) -> dict[str, Any]:
        rows = sum(pq.ParquetFile(self.root / n).metadata.num_rows for n in self.shard_names())
        # One file's reasons at a time: memory is one shard's column, not the stage's.
        reasons: Counter = Counter()
        for p in self.rejected_paths():
            reasons.update(reason_code(r) for r in pq.read_table(p, columns=["reason"]).column(0).to_pylist())
        return {"shards": len(self.shard_names()), "records": rows,
                "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items()))}


@dataclass(frozen=True)
class StagedShard:
    """A shard written in full under `.tmp/`, waiting for the driver's `commit_staged`."""

    name: str
    path: str
    rejected_path: str | None
    rows: int
    rejected_rows: int


def stage_shard(root: str | os.PathLike, index: int, records: list[dict], rejected: list[dict],
                schema: pa.Schema, rejected_schema: pa.Schema) -> StagedShard:
    """Write shard `index` of the dataset at `root` (and its rejected twin) to unique temporary
    names in `root/.tmp/`, fsynced, not yet visible. Runs in workers: the data never passes
    through the driver, which only renames (`ShardStore.commit_staged`)."""
    tmp = Path(root) / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    name, tag = shard_name(index), uuid.uuid4().hex[:12]

    def write(rows: list[dict], sch: pa.Schema, dest: Path) -> str:
        pq.write_table(pa.Table.from_pylist(list(rows), schema=sch), dest)
        fsync_file(dest)
        return str(dest)

    rej = write(rejected, rejected_schema, tmp / f"rejected-{name}.{tag}") if rejected else None
    return StagedShard(name, write(records, schema, tmp / f"{name}.{tag}"), rej, len(records), len(rejected))


class ShardRows:
    """The rows of a stage directory (or its rejected/ part) as a stream that can be iterated
    again: one shard's rows in memory at a time, in shard order. `len` reads only the Parquet
    footers. A driver that needs a stage's rows more than once (generate reads the source three
    times) holds a shard, never the stage."""

    def __init__(self, root: str | os.PathLike, columns: Iterable[str] | None = None, *, rejected: bool = False):
        self.root = Path(root) / (REJECTED if rejected else "")
        self.columns = list(columns) if columns is not None else None

    def paths(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet"))

    def __iter__(self) -> Iterator[dict]:
        for p in self.paths():
            yield from pq.read_table(p, columns=self.columns).to_pylist()

    def __len__(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.paths())


def read_records(root: str | os.PathLike, columns: Iterable[str] | None = None, *, rejected: bool = False) -> list[dict]:
    """All records of a stage directory (or its rejected/ part), in shard order, as one list (tests
    and small stages; a stage's driver streams with `ShardRows`)."""
    return list(ShardRows(root, columns, rejected=rejected))


def require_complete(root: str | os.PathLike, what_to_run: str) -> Manifest:
    """The manifest of a finished upstream stage, or an error naming the command to run."""
    m = Manifest.read(Path(root))
    if m is None or m.status != "complete":
        state = "missing" if m is None else f"not complete (status {m.status!r})"
        raise MissingInputError(f"{root} is {state}; run `{what_to_run}` first")
    return m
