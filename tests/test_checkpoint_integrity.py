"""Checkpoint manifests: sizes + sha256 written last; resume skips a truncated or corrupted
checkpoint for the newest intact one and says what was wrong. Pure file protocol, no training."""

from __future__ import annotations

import json

import pytest

from distill.train import checkpoint as ck


def _save(root, step, keep=3, checksums=True):
    def parts(tmp):
        (tmp / "ds").mkdir()
        # Two "shards" per checkpoint, with content that differs per step.
        (tmp / "ds" / "model_states.pt").write_bytes(bytes(range(256)) * (40 + step))
        (tmp / "ds" / "optim_states.pt").write_bytes(b"adam" * (1000 + step))

    return ck.save_checkpoint(root, step, {"world_size": 1}, rank=0, keep_last=keep, write_parts=parts,
                              barrier=lambda: None, checksums=checksums)


def _flip(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    final = _save(tmp_path, 2)
    manifest = json.loads((final / ck.MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()} - {ck.MANIFEST}
    assert set(manifest) == on_disk
    assert {"ds/model_states.pt", "ds/optim_states.pt", ck.STATE_FILE, "rng/rank-00000.json"} <= on_disk
    shard = final / "ds" / "optim_states.pt"
    assert manifest["ds/optim_states.pt"] == {"size": shard.stat().st_size,
                                              "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    assert ck.verify_checkpoint(final) == []
    assert ck.latest_good_checkpoint(tmp_path, warn=pytest.fail) == final


def test_truncated_latest_and_flipped_previous_fall_back_to_the_intact_one(tmp_path):
    oldest, middle, newest = (_save(tmp_path, s) for s in (2, 4, 6))
    shard = newest / "ds" / "model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])  # a copy cut short
    _flip(middle / "ds" / "optim_states.pt")  # same size, different bytes

    warnings: list[str] = []
    assert ck.latest_good_checkpoint(tmp_path, warn=warnings.append) == oldest
    assert len(warnings) == 2
    assert "step-00000006" in warnings[0] and "ds/model_states.pt" in warnings[0] and "truncated" in warnings[0]
    assert "step-00000004" in warnings[1] and "ds/optim_states.pt" in warnings[1] and "sha256" in warnings[1]


def test_sizes_only_catch_truncation_but_not_flipped_bytes(tmp_path):
    older, newest = _save(tmp_path, 2, checksums=False), _save(tmp_path, 4, checksums=False)
    assert "sha256" not in json.loads((newest / ck.MANIFEST).read_text())["files"]["ds/model_states.pt"]
    _flip(newest / "ds" / "model_states.pt")
    assert ck.latest_good_checkpoint(tmp_path, checksums=False, warn=pytest.fail) == newest
    (older / "ds" / "optim_states.pt").write_bytes(b"")
    assert "ds/optim_states.pt" in ck.verify_checkpoint(older, checksums=False)[0]


def test_missing_file_or_manifest_is_named(tmp_path):
    final = _save(tmp_path, 2)
    (final / "rng" / "rank-00000.json").unlink()
    assert ck.verify_checkpoint(final) == ["rng/rank-00000.json is missing"]
    (final / ck.MANIFEST).unlink()
    assert "no manifest.json" in ck.verify_checkpoint(final)[0]


def test_latest_naming_a_missing_directory_falls_back_with_a_warning(tmp_path):
    good = _save(tmp_path, 2)
    (tmp_path / ck.LATEST).write_text("step-00000009\n")
    warnings: list[str] = []
    assert ck.latest_good_checkpoint(tmp_path, warn=warnings.append) == good
    assert "step-00000009" in warnings[0]


def test_no_intact_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    assert ck.latest_good_checkpoint(tmp_path) is None  # nothing saved yet: start from step 0
    final = _save(tmp_path, 2)
    _flip(final / "ds" / "model_states.pt")
    with pytest.raises(RuntimeError, match="no intact checkpoint.*step-00000002.*model_states.pt"):
        ck.latest_good_checkpoint(tmp_path, warn=lambda m: None)
