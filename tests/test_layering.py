"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and atomic writes have one
home (distill/fsio.py). Fast: a static look at the source, nothing imported or run (~5 s)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DISTILL = REPO / "distill"

# The one file allowed to rename and fsync on its own: the home of atomic writes.
OWNERS = {"distill/fsio.py"}

# Calls allowed outside those files, each with why: (file, a piece of the call).
EXCEPTIONS = {
    # Not a commit: shards are written as shard-<i>.tmp inside the private export directory and
    # named once their count is known; the directory itself is put in place by fsio.replace_dir.
    ("distill/export/hf.py", 'os.replace(tmp / f"shard-{i}.tmp", tmp / final)'),
}


def test_import_contracts_hold():
    """`lint-imports` (import-linter) over the layers and forbidden imports in pyproject.toml.
    Its output names each broken import chain with file and line."""
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.is_file(), f"no {lint}: install the dev extra (pip install -e '.[dev]', or make venv)"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout, proc.stdout[-6000:]


def _renames_and_fsyncs(path: Path) -> list[tuple[int, str]]:
    """Calls that commit a file by hand: os.replace / os.rename / os.fsync / shutil.move, and
    `x.replace(dest)` / `x.rename(dest)` with one argument (pathlib; str.replace takes two)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f = node.func
        owner = f.value.id if isinstance(f.value, ast.Name) else None
        if (owner, f.attr) in {("os", "replace"), ("os", "rename"), ("os", "fsync"), ("shutil", "move")} or (
            f.attr in ("replace", "rename") and owner not in ("os", "shutil") and len(node.args) == 1 and not node.keywords
        ):
            found.append((node.lineno, ast.get_source_segment(path.read_text(), node) or f.attr))
    return found


def test_atomic_writes_have_one_home():
    """Anything that renames a finished file or directory into place, or fsyncs, goes through
    distill.fsio (atomic_write_*, atomic_writer, write_parquet_atomic, replace_dir)."""
    stray = []
    for path in sorted(DISTILL.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in OWNERS:
            continue
        for line, call in _renames_and_fsyncs(path):
            if not any(rel == f and piece in call for f, piece in EXCEPTIONS):
                stray.append(f"{rel}:{line}: {call}")
    assert not stray, "write through distill.fsio instead:\n" + "\n".join(stray)


def test_exceptions_are_current():
    """Every exception above still exists (a stale one would let a new copy in unnoticed)."""
    for rel, piece in EXCEPTIONS:
        calls = [call for _, call in _renames_and_fsyncs(REPO / rel)]
        assert any(piece in call for call in calls), f"{rel} no longer has {piece!r}; remove it from EXCEPTIONS"
