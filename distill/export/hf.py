"""Export a training checkpoint as a Hugging Face model directory.

The backend that wrote the checkpoint (`ckpt/ds/` DeepSpeed, `ckpt/megatron/` Megatron) turns
its shards into (HF name, tensor) pairs, one tensor at a time (`distill.train.backends.hf_tensors`);
this module writes them as sharded safetensors plus the config, tokenizer, chat template and
generation config saved beside them (`ckpt/hf/`), a shard as soon as it reaches the size limit,
into a directory that appears by rename when complete.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path

from distill.fsio import replace_dir
from distill.train.backends import ExportError, checkpoint_backend, hf_tensors
from distill.train.checkpoint import latest_checkpoint

_DTYPES = {"float32", "bfloat16"}


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a checkpoints root (its `latest` one)."""
    path = Path(path)
    if checkpoint_backend(path) is not None:
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise ExportError(f"{path} is neither a checkpoint (no backend's shards inside) nor a checkpoints directory "
                          "with a `latest` pointer; pass RUN/train/checkpoints or one of its step-* directories")
    return latest


def export_checkpoint(ckpt_dir: Path, out_dir: Path, *, max_shard_size_mb: int = 2000, dtype: str = "auto") -> Path:
    """Write a Hugging Face model directory from a training checkpoint; returns `out_dir`.

    `ckpt_dir` is a `step-*` checkpoint or the checkpoints root (then `latest`), of either
    backend (DeepSpeed `ds/` or Megatron `megatron/` shards). `dtype` `auto` keeps the dtype the
    model was trained in (config.json `dtype`). The directory appears by rename when complete;
    an existing `out_dir` is replaced."""
    if dtype != "auto" and dtype not in _DTYPES:
        raise ExportError(f"dtype={dtype!r}: expected auto, {', '.join(sorted(_DTYPES))}")
    ckpt = resolve_checkpoint(Path(ckpt_dir))
    # The backend that wrote the checkpoint turns its shards into HF tensors; this module writes.
    return write_model_dir(hf_tensors(ckpt), ckpt / "hf", Path(out_dir), max_shard_size_mb=max_shard_size_mb,
                           dtype=dtype)


def write_model_dir(tensors, hf_src: Path, out_dir: Path, *, max_shard_size_mb: int, dtype: str) -> Path:
    """Write (HF name, tensor) pairs as sharded safetensors, plus the config, tokenizer and chat
    template files of `hf_src`, into `out_dir` (atomically, by rename). Tensors are consumed one
    at a time: peak memory is one shard plus one tensor."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((hf_src / "config.json").read_text())
    if dtype == "auto":
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = dtype if dtype in _DTYPES else "float32"
    torch_dtype = getattr(torch, dtype)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir_beside(out_dir)
    try:
        limit = max_shard_size_mb * 1024 * 1024
        shards: list[dict] = [{}]
        size = 0
        files: list[str] = []
        weight_map: dict[str, int] = {}
        total = 0

        def flush() -> None:
            nonlocal size
            if shards[-1]:
                files.append(str(len(files)))
                save_file(shards[-1], str(tmp / f"shard-{len(files) - 1}.tmp"), metadata={"format": "pt"})
                shards.append({})
                size = 0

        for key, tensor in tensors:
            t = tensor.to(torch_dtype).contiguous()
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > limit:
                flush()
            shards[-1][key] = t
            weight_map[key] = len(files)
            size += nbytes
            total += nbytes
        flush()
        n = len(files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            os.replace(tmp / f"shard-{i}.tmp", tmp / final)
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        for f in hf_src.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copyfile(f, tmp / f.name)
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        config.pop("_attn_implementation", None)  # the packed training attention is not for inference
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        # safetensors writes its files 0600; give every file the mode the umask gives new files
        # (the directory's, which mkdir took from the umask, less the execute bits).
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666
        for f in tmp.iterdir():
            f.chmod(file_mode)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fresh_dir_beside(out_dir: Path) -> Path:
    """A new, uniquely named directory beside `out_dir` to build it in, with the umask's mode.

    Not tempfile.mkdtemp: that makes it 0700 whatever the umask, and the rename keeps the mode, so
    on a shared cluster nobody but the trainer could read the exported model."""
    while True:
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(6)}"
        try:
            tmp.mkdir()  # mode 0o777 & ~umask
            return tmp
        except FileExistsError:
            continue
