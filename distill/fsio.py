"""File helpers every part of the pipeline shares: atomic writes, hashing, JSON Lines, quarantine.

One home for each, so that durability and naming rules are decided once:

- A file or directory that others read appears whole or not at all: it is written under a
  temporary name beside its destination, fsynced, renamed, and the parent directory fsynced
  (without the last step a power loss can forget the rename itself).
- Hashes are sha256; `fingerprint` and `hash_files` keep the first 16 hex digits, which name
  caches and settings, not security boundaries.
- A JSON Lines row that cannot be read is not an exception but a `Row` whose value is the reason,
  so readers can quarantine it (`quarantine_record`) with its `file:line` and go on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import pyarrow as pa

# --------------------------------------------------------------------------- atomic writes


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside `path` durable (without it a power loss can forget a committed file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's data to disk (before renaming it into place)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def rename_into_place(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename the finished, fsynced `tmp` over `dest` (same filesystem; a directory only onto
    nothing, see `replace_dir`) and fsync the parent: the commit point of every write here, and
    of files a worker staged for this process to put in place."""
    os.replace(tmp, dest)
    fsync_dir(Path(dest).parent)


@contextmanager
def atomic_writer(path: str | os.PathLike, *, binary: bool = False) -> Iterator[IO]:
    """An open file (UTF-8 text, or bytes with `binary`) that becomes `path` when the block ends without an exception: written under a
    unique temporary name beside `path`, fsynced, renamed over `path`, parent fsynced. On an
    exception the temporary file is removed and `path` is left as it was.

    Not tempfile.mkstemp: that makes the file 0600 whatever the umask, and the rename keeps it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        rename_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path, binary=True) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_writer(path) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """`json.dumps(obj, **dumps)` and a final newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps) + "\n")


def write_parquet_atomic(table: pa.Table, dest: Path, tmp_dir: Path) -> None:
    """Write `table` to `dest` so that `dest` either does not exist or is complete. The temporary
    file goes in `tmp_dir` (a stage's `.tmp/`), not beside `dest`, so a reader globbing `dest`'s
    directory never sees it; `tmp_dir` must be on the same filesystem."""
    import pyarrow.parquet as pq

    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{dest.name}.{os.getpid()}"
    pq.write_table(table, tmp)
    fsync_file(tmp)
    rename_into_place(tmp, dest)


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put the finished directory `tmp` in place as `dest` (deleting an old `dest` first) and fsync
    the parent. Not atomic when `dest` exists: a crash between the delete and the rename leaves no
    `dest`, which callers treat as "not built yet", never as a partial one. `tmp` must be beside
    `dest` (same filesystem)."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    rename_into_place(tmp, dest)
    return dest


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_files(files: Iterable[str | os.PathLike]) -> str:
    """One 16-hex-digit hash of several files' names (not directories) and bytes, in the order
    given: a renamed or edited input changes it, a moved directory does not."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def fingerprint(obj: Any) -> str:
    """16 hex digits of the sha256 of `obj` as sorted JSON (non-JSON values by their str())."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- JSON Lines and quarantine


RAW_LIMIT = 2000
"""Quarantined raw text is cut here: enough to see the problem, bounded size."""

QUARANTINE_SCHEMA = pa.schema([("location", pa.string()), ("reason", pa.string()), ("raw", pa.string())])
"""Columns of a stage's rejected/ rows: where the row came from (`file:line`, `file:row N`), why
it was rejected (`code: detail`, see `distill.store.reason_code`) and its text, cut."""


def quarantine_record(location: str, reason: str, raw: str) -> dict:
    return {"location": location, "reason": reason, "raw": raw[:RAW_LIMIT]}


@dataclass
class Row:
    """One input row: where it came from, and its value, or the reason it could not be read."""

    location: str  # "path:line" or "dataset[split]:row N"
    value: Any  # a dict, or an error string when the row could not be decoded at all
    raw: str = ""


def iter_jsonl(path: str | os.PathLike, start: int = 0, stop: int | None = None, first_line: int = 1) -> Iterator[Row]:
    """Rows of a JSON Lines file, blank lines skipped; a line that is not UTF-8, not JSON or not a
    JSON object yields a `Row` whose value is the reason (`undecodable: ...`, `invalid_json: ...`,
    `not_an_object: ...`). A UTF-8 byte-order mark opening the file (some editors write one) is
    skipped. With `start`/`stop`, only the lines in bytes [start, stop), where `start` is the
    first byte of line `first_line` (one parallel reader's share)."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = f if stop is None else io.BytesIO(f.read(stop - start))
        for lineno, raw in enumerate(lines, start=first_line):
            if start == 0 and lineno == first_line:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                # The text is only kept for the quarantine, which cuts it there anyway.
                yield Row(where, f"undecodable: bytes that are not UTF-8 at byte {e.start}",
                          raw[:RAW_LIMIT].decode("utf-8", "replace"))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield Row(where, f"invalid_json: {e.msg} at column {e.colno}", text)
                continue
            yield Row(where, value if isinstance(value, dict) else f"not_an_object: got JSON {type(value).__name__}", text)


def read_jsonl(path: str | os.PathLike, *, skip_invalid: bool = False) -> list[dict]:
    """The objects of a JSON Lines file. A line that is not a JSON object raises ValueError
    naming `file:line`, or with `skip_invalid` is dropped (a torn last line of a log that a killed
    process was appending to)."""
    out = []
    for row in iter_jsonl(path):
        if isinstance(row.value, str):
            if skip_invalid:
                continue
            raise ValueError(f"{row.location}: {row.value}")
        out.append(row.value)
    return out


# --------------------------------------------------------------------------- reading in parallel
#
# A large input is cut into chunks (a byte range of a JSONL file, a row range of a Parquet file)
# that workers read on their own: the driver never parses a row, and each row is still named
# `file:line` / `file:row N` exactly as one serial read names it.


@dataclass(frozen=True)
class Chunk:
    """JSONL bytes [start, stop), the first of which begins line `line`; or Parquet rows
    [start, stop), 0-based (`line` unused)."""

    path: str
    start: int
    stop: int
    line: int = 1


def plan_chunks(files: Iterable[Path], chunk_bytes: int) -> list[Chunk]:
    """The input cut into chunks of about `chunk_bytes` of text, in input order. Pure but for
    reading the files (JSONL: one pass at ~GB/s to cut at line ends and count lines)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes}: must be positive")
    return [c for f in files for c in (_parquet_chunks(Path(f), chunk_bytes) if str(f).endswith(".parquet")
                                       else _jsonl_chunks(Path(f), chunk_bytes))]


def _jsonl_chunks(path: Path, chunk_bytes: int) -> list[Chunk]:
    chunks, start, line = [], 0, 1
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            block += f.readline()  # finish the line the block cut into (b"" at the end of the file)
            chunks.append(Chunk(str(path), start, start + len(block), line))
            start += len(block)
            line += block.count(b"\n")
    return chunks


def _parquet_chunks(path: Path, chunk_bytes: int) -> list[Chunk]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    if meta.num_rows == 0:
        return []
    text = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))  # uncompressed
    rows = max(1, int(meta.num_rows * chunk_bytes / max(text, 1)))
    return [Chunk(str(path), a, min(a + rows, meta.num_rows)) for a in range(0, meta.num_rows, rows)]


def parquet_rows(path: str, start: int = 0, stop: int | None = None) -> Iterator[Row]:
    """Rows [start, stop) named `file:row N` (1-based). Only the row groups that overlap are
    decoded; a group split over k chunks is decoded k times, which costs little next to what is
    done with its rows."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    stop = pf.metadata.num_rows if stop is None else stop
    groups, first, base = [], 0, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first < stop and first + n > start:
            base = base if groups else first
            groups.append(g)
        first += n
    if not groups:
        return
    table = pf.read_row_groups(groups).slice(start - base, stop - start)
    for batch in table.to_batches(max_chunksize=1024):
        for i, row in enumerate(batch.to_pylist(), start=start + 1):
            yield Row(f"{path}:row {i}", row, "")
        start += batch.num_rows


def chunk_rows(chunk: Chunk) -> Iterator[Row]:
    if chunk.path.endswith(".parquet"):
        return parquet_rows(chunk.path, chunk.start, chunk.stop)
    return iter_jsonl(Path(chunk.path), chunk.start, chunk.stop, chunk.line)
