"""Export a training checkpoint as a Hugging Face model directory.

Reads the DeepSpeed files of one checkpoint (`ckpt/ds/`) and writes sharded safetensors plus the
config, tokenizer, chat template and generation config saved beside them (`ckpt/hf/`).

Weights come from the fp32 master copy in the optimizer partitions (ZeRO 1-3), consolidated one
parameter at a time: each rank's partition file is memory-mapped (`torch.load(mmap=True,
weights_only=True)`), a parameter's pieces are copied out of every rank's file, and a shard is
written as soon as it reaches the size limit. Peak memory is one shard plus one parameter, never
the whole model twice. ZeRO-0 has no partitions: its (replicated) module weights are used.

- ZeRO-1/2: each rank's file maps every parameter that overlaps its partition to a fragment
  (`param_slice_mappings`: name -> start, numel); a parameter is its fragments in rank order.
- ZeRO-3: every parameter is split evenly: rank r holds elements [r*p, (r+1)*p) with
  p = ceil(numel / world), in `param_shapes` order; the last rank's piece is zero-padded.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import stat
from pathlib import Path

from distill.fsio import replace_dir
from distill.train.backends.deepspeed import CHECKPOINT_TAG, load_weights_only
from distill.train.checkpoint import latest_checkpoint

_PREFIX = "student."  # the training wrapper's attribute (backends.deepspeed.PackedLoss)
_DTYPES = {"float32", "bfloat16"}


class ExportError(ValueError):
    """A checkpoint that cannot be exported, phrased for the user."""


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a checkpoints root (its `latest` one)."""
    from distill.train.backends.megatron import CHECKPOINT_TAG as MEGATRON_TAG

    path = Path(path)
    if (path / CHECKPOINT_TAG).is_dir() or (path / MEGATRON_TAG).is_dir():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise ExportError(f"{path} is neither a checkpoint (no {CHECKPOINT_TAG}/ inside) nor a checkpoints directory "
                          "with a `latest` pointer; pass RUN/train/checkpoints or one of its step-* directories")
    return latest


def _rank_files(ds_dir: Path, kind: str) -> list[Path]:
    files = sorted(ds_dir.glob(f"*zero_pp_rank_*_mp_rank_00_{kind}.pt"),
                   key=lambda p: int(p.name.split("zero_pp_rank_")[1].split("_")[0]))
    return files


def _span(groups: list, start: int, length: int):
    """Elements [start, start+length) of the concatenation of flat tensors, without building it."""
    import torch

    pieces, at = [], 0
    for g in groups:
        n = g.numel()
        lo, hi = max(start, at), min(start + length, at + n)
        if lo < hi:
            pieces.append(g.narrow(0, lo - at, hi - lo))
        at += n
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def iter_fp32_params(ds_dir: Path):
    """(name, fp32 tensor) for every trainable parameter, consolidated one at a time, in the
    model's parameter order; then frozen parameters and buffers from the module state."""
    import torch

    ds_dir = Path(ds_dir)
    optim_files = _rank_files(ds_dir, "optim_states")
    model_file = ds_dir / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        model_file = next(iter(_rank_files(ds_dir, "model_states")), None)
    if model_file is None:
        raise ExportError(f"{ds_dir} holds no DeepSpeed model states file")
    model_state = load_weights_only(model_file, mmap=True)
    if not optim_files:  # ZeRO-0: the module state is the full model
        for name, t in model_state["module"].items():
            yield name, t.float()
        return
    world = len(optim_files)
    parts = [load_weights_only(f, mmap=True)["optimizer_state_dict"] for f in optim_files]
    stage = int(parts[0]["zero_stage"])
    shapes = model_state["param_shapes"]
    if stage == 3:
        flats = [p["fp32_flat_groups"] for p in parts]
        offset = 0
        for name, shape in ((n, s) for group in shapes for n, s in group.items()):
            numel = math.prod(shape)
            per_rank = math.ceil(numel / world)
            full = torch.cat([_span(flats[r], offset, per_rank) for r in range(world)])
            offset += per_rank
            yield name, full.narrow(0, 0, numel).view(*shape).clone()
    else:
        flats = [p["single_partition_of_fp32_groups"] for p in parts]
        maps = [p["param_slice_mappings"] for p in parts]
        for g, group in enumerate(shapes):
            for name, shape in group.items():
                pieces = []
                for r in range(world):
                    frag = maps[r][g].get(name)
                    if frag is not None:
                        pieces.append(flats[r][g].narrow(0, frag.start, frag.numel))
                full = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
                if full.numel() != math.prod(shape):
                    raise ExportError(f"{name}: fragments hold {full.numel()} elements, shape {tuple(shape)} needs "
                                      f"{math.prod(shape)}; the checkpoint in {ds_dir} is inconsistent")
                yield name, full.view(*shape)
    # Frozen parameters and persistent buffers are not in the optimizer: the module state has them.
    trainable = {n for group in shapes for n in group}
    for name, t in model_state["module"].items():
        if name not in trainable and t.numel() > 0:
            yield name, t.float()


def _hf_name(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def export_checkpoint(ckpt_dir: Path, out_dir: Path, *, max_shard_size_mb: int = 2000, dtype: str = "auto") -> Path:
    """Write a Hugging Face model directory from a training checkpoint; returns `out_dir`.

    `ckpt_dir` is a `step-*` checkpoint or the checkpoints root (then `latest`), of either
    backend (DeepSpeed `ds/` or Megatron `megatron/` shards). `dtype` `auto` keeps the dtype the
    model was trained in (config.json `dtype`). The directory appears by rename when complete;
    an existing `out_dir` is replaced."""
    from distill.train.backends.megatron import CHECKPOINT_TAG as MEGATRON_TAG

    if dtype != "auto" and dtype not in _DTYPES:
        raise ExportError(f"dtype={dtype!r}: expected auto, {', '.join(sorted(_DTYPES))}")
    ckpt = resolve_checkpoint(Path(ckpt_dir))
    if (ckpt / MEGATRON_TAG).is_dir():
        from distill.export.megatron import iter_hf_tensors

        return write_model_dir(iter_hf_tensors(ckpt / MEGATRON_TAG), ckpt / "hf", Path(out_dir),
                               max_shard_size_mb=max_shard_size_mb, dtype=dtype)
    model_state_names = _shared_params(ckpt / CHECKPOINT_TAG)
    tied = bool(json.loads((ckpt / "hf" / "config.json").read_text()).get("tie_word_embeddings", False))
    # lm_head shares the embedding; transformers ties it again on load
    tensors = ((_hf_name(name), t) for name, t in iter_fp32_params(ckpt / CHECKPOINT_TAG)
               if not (tied and name in model_state_names))
    return write_model_dir(tensors, ckpt / "hf", Path(out_dir), max_shard_size_mb=max_shard_size_mb, dtype=dtype)


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


def _shared_params(ds_dir: Path) -> set[str]:
    """Names DeepSpeed recorded as aliases of another parameter (tied weights)."""
    model_file = ds_dir / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        model_file = next(iter(_rank_files(ds_dir, "model_states")), None)
    state = load_weights_only(model_file, mmap=True)
    return set(state.get("shared_params", {}))
