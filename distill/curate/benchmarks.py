"""Benchmark test sets to decontaminate against: local files or Hub datasets -> problem texts.

Each benchmark is named in the config (`BenchmarkRef`) by a local JSONL / Parquet file, a
directory of them, a `save_to_disk` directory, or a Hub id read through
`datasets.load_dataset`. Loading records the files read and the sha256 of each, so a manifest
line "decontaminated against aime24" names exactly which copy was used.

Every problem (unreadable file, missing column, empty benchmark, Hub id not reachable) raises
`BenchmarkError` naming the benchmark, the file and what is wrong; `load_benchmarks` is meant to
run before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import field_validator

from distill.fsio import iter_jsonl, sha256_file
from distill.section import Section


class BenchmarkError(ValueError):
    """A benchmark that cannot be used, phrased for the user (which benchmark, which file, why)."""


class BenchmarkRef(Section):
    """One benchmark test set to check curated records against."""

    name: str
    """Name recorded in every match and in the stage manifest (e.g. `aime24`). Unique per config."""

    path: str
    """A local `.jsonl` / `.json` / `.parquet` file, a directory of such files (all read, sorted by
    name), a `datasets.save_to_disk` directory, or a Hub dataset id (`HuggingFaceH4/MATH-500`)
    read with `datasets.load_dataset` (needs the Hub or its local cache)."""

    split: str = "test"
    """Split to read for Hub ids and `save_to_disk` directories; ignored for plain files."""

    hub_config: str | None = None
    """Hub dataset config name (`openai/gsm8k` needs `main`); unset for datasets without configs."""

    column: str = "problem"
    """Column holding the problem text (`question` for GSM8K on the Hub)."""

    id_column: str | None = "id"
    """Column with a stable item id, recorded in matches; when unset or absent from the data the
    id is `<name>-<row index>`."""

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


@dataclass
class Benchmark:
    """A loaded benchmark: its items and the exact copy they came from."""

    name: str
    items: list[tuple[str, str]]  # (item id, problem text), in file order
    files: list[str]  # every file read (for a Hub id: its cached Arrow files)
    sha256: dict[str, str] = field(default_factory=dict)  # file -> sha256 of its bytes

    def provenance(self) -> dict:
        """What a stage manifest records about this benchmark."""
        return {"name": self.name, "items": len(self.items), "files": list(self.files), "sha256": dict(self.sha256)}


def _rows_jsonl(path: Path, ref: BenchmarkRef):
    try:
        for row in iter_jsonl(path):
            if isinstance(row.value, str):
                raise BenchmarkError(f"benchmark {ref.name!r}: {row.location} is not valid JSON Lines: {row.value}")
            yield row.location, row.value
    except OSError as e:
        raise BenchmarkError(f"benchmark {ref.name!r}: cannot read {path}: {e.strerror}") from e


def _rows_parquet(path: Path, ref: BenchmarkRef):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise BenchmarkError(f"benchmark {ref.name!r}: cannot read {path} as Parquet: {e}") from e
    if ref.column not in table.column_names:
        raise BenchmarkError(
            f"benchmark {ref.name!r}: {path} has no column {ref.column!r} (columns: {', '.join(table.column_names)}); "
            f"set the benchmark's `column`"
        )
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {i}", row


def _files_of(path: Path, ref: BenchmarkRef) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".parquet"))
    if not files:
        raise BenchmarkError(f"benchmark {ref.name!r}: directory {path} holds no .jsonl, .json or .parquet file")
    return files


def _items_from_rows(rows, ref: BenchmarkRef, what: str, start: int = 0) -> list[tuple[str, str]]:
    """(id, text) per row; `start` numbers rows without an id after those of earlier files."""
    items = []
    for where, row in rows:
        if ref.column not in row:
            raise BenchmarkError(
                f"benchmark {ref.name!r}: {where} has no column {ref.column!r} (columns: {', '.join(map(str, row))}); "
                f"set the benchmark's `column`"
            )
        text = row[ref.column]
        if not isinstance(text, str):
            raise BenchmarkError(
                f"benchmark {ref.name!r}: {where}: column {ref.column!r} is a {type(text).__name__}, expected a string"
            )
        raw_id = row.get(ref.id_column) if ref.id_column else None
        item_id = str(raw_id) if raw_id is not None and str(raw_id).strip() else f"{ref.name}-{start + len(items)}"
        items.append((item_id, text))
    if not items:
        raise BenchmarkError(f"benchmark {ref.name!r}: {what} has no rows")
    return items


def _load_datasets(ref: BenchmarkRef) -> Benchmark:
    import datasets

    local = Path(ref.path)
    try:
        if local.is_dir():
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(ref.path, ref.hub_config, split=ref.split)
    except Exception as e:  # offline, unknown id, unknown split: one message naming the key
        raise BenchmarkError(
            f"benchmark {ref.name!r}: could not load {ref.path!r} (split {ref.split!r}) with datasets: {e}"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if ref.split not in ds:
            raise BenchmarkError(f"benchmark {ref.name!r}: {ref.path} has no split {ref.split!r} (splits: {', '.join(ds)})")
        ds = ds[ref.split]
    if ref.column not in ds.column_names:
        raise BenchmarkError(
            f"benchmark {ref.name!r}: {ref.path}[{ref.split}] has no column {ref.column!r} "
            f"(columns: {', '.join(ds.column_names)}); set the benchmark's `column`"
        )
    cols = [ref.column] + ([ref.id_column] if ref.id_column in ds.column_names else [])
    rows = ((f"{ref.path}[{ref.split}] row {i}", row) for i, row in enumerate(ds.select_columns(cols)))
    items = _items_from_rows(rows, ref, f"{ref.path}[{ref.split}]")
    files = sorted({c["filename"] for c in ds.cache_files})
    return Benchmark(ref.name, items, files, {f: sha256_file(Path(f)) for f in files})


def load_benchmark(ref: BenchmarkRef) -> Benchmark:
    """Read one benchmark; raises `BenchmarkError` when it cannot be used."""
    path = Path(ref.path).expanduser()
    is_saved_dataset = path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
    if path.exists() and not is_saved_dataset:
        if path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet"):
            raise BenchmarkError(f"benchmark {ref.name!r}: {path} is not .jsonl, .json or .parquet")
        files = _files_of(path, ref)
        items: list[tuple[str, str]] = []
        for f in files:
            rows = _rows_parquet(f, ref) if f.suffix == ".parquet" else _rows_jsonl(f, ref)
            items.extend(_items_from_rows(rows, ref, str(f), start=len(items)))
        return Benchmark(ref.name, items, [str(f) for f in files], {str(f): sha256_file(f) for f in files})
    if not path.exists() and (path.suffix in (".jsonl", ".json", ".parquet") or ref.path.startswith((".", "/", "~"))):
        raise BenchmarkError(f"benchmark {ref.name!r}: {ref.path} does not exist (relative paths are relative to the working directory)")
    return _load_datasets(ref)


def load_benchmarks(refs: list[BenchmarkRef]) -> list[Benchmark]:
    """Read every benchmark; raises `BenchmarkError` on the first one that cannot be used, so a
    run fails before any work rather than after hours of generation."""
    names = [r.name for r in refs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchmarkError(f"benchmark names must be unique; repeated: {', '.join(dup)}")
    return [load_benchmark(r) for r in refs]
