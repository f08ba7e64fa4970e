"""The exported model directory takes the umask's permissions: on a shared cluster a umask of 022
makes it readable by the group and others (tempfile.mkdtemp made it 0700 whatever the umask)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from distill.export.hf import write_model_dir


def _export(tmp_path: Path, umask: int, max_shard_size_mb: int = 1) -> Path:
    import torch

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text('{"dtype": "float32"}')
    (src / "tokenizer.json").write_text("{}")
    os.chmod(src / "tokenizer.json", 0o600)  # a private checkpoint file must not pass its mode on
    # Two tensors over a 1 MB limit: two shards plus an index, every kind of file the export writes.
    tensors = [("a.weight", torch.zeros(300, 1000)), ("b.weight", torch.ones(300, 1000))]
    old = os.umask(umask)
    try:
        return write_model_dir(iter(tensors), src, tmp_path / "out" / "model", max_shard_size_mb=max_shard_size_mb,
                               dtype="auto")
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_export_dir_and_files_follow_the_umask(tmp_path, umask):
    out = _export(tmp_path, umask)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "tokenizer.json"]
    assert _mode(out) == 0o777 & ~umask, oct(_mode(out))
    for p in out.iterdir():
        assert _mode(p) == 0o666 & ~umask, (p.name, oct(_mode(p)))
    assert not [p for p in out.parent.iterdir() if p.name != "model"]  # no leftover temporary directory


def test_umask_022_makes_the_export_readable_by_others(tmp_path):
    out = _export(tmp_path, 0o022)
    assert _mode(out) & stat.S_IROTH and _mode(out) & stat.S_IXOTH and _mode(out) & stat.S_IRGRP
    assert all(_mode(p) & stat.S_IROTH and _mode(p) & stat.S_IRGRP for p in out.iterdir())
