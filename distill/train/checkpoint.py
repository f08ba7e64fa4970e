"""Training checkpoints: atomic directories, a `latest` pointer, the last K kept, RNG in JSON.

Layout of `checkpoints/`:

    step-00000200/          one complete checkpoint
      ds/                   the backend's files (model, optimizer, scheduler; per rank)
      hf/                   config, tokenizer, chat template, generation config (for export)
      rng/rank-00000.json   each rank's python / numpy / torch RNG states
      trainer_state.json    step (the data cursor: an index into the StepPlan) and what the
                            plan depends on, checked on resume
    latest                  "step-00000200", replaced atomically

A checkpoint is written into `.tmp-step-...`, and renamed once every rank's files are there;
`latest` is written to a temporary file and renamed after that. A crash at any point leaves
either the previous `latest` or the new one, never a pointer to a partial directory. The
directory must be on storage every rank sees (the local disk on one machine).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from distill.store import atomic_write_text, fsync_dir

LATEST = "latest"
STATE_FILE = "trainer_state.json"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


def step_dirname(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file beside `path`, fsync, rename over `path`."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    ckpt = Path(root) / pointer.read_text().strip()
    if not (ckpt / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {ckpt.name}, which is missing or incomplete; point it at a "
                                f"complete step-* directory or delete {pointer} to start over")
    return ckpt


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    found = [p for p in Path(root).glob(f"{_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def begin(root: Path, step: int) -> Path:
    """The temporary directory for the checkpoint of `step`, empty (call on one rank, then barrier)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}{_PREFIX}*"):  # a killed save's leftovers
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{_TMP_PREFIX}{step_dirname(step)}"
    tmp.mkdir()
    return tmp


def commit(root: Path, tmp: Path, step: int, state: dict, *, keep_last: int) -> Path:
    """Finish a checkpoint every rank has written into `tmp` (call on one rank): state file,
    rename, `latest`, then delete all but the newest `keep_last`."""
    root = Path(root)
    write_json_atomic(Path(tmp) / STATE_FILE, {**state, "step": step})
    final = root / step_dirname(step)
    if final.exists():  # the same step saved again (a resumed run that stopped at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_json_pointer(root, final.name)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_json_pointer(root: Path, name: str) -> None:
    atomic_write_text(root / LATEST, name + "\n")
    fsync_dir(root)


def save_checkpoint(root: Path, step: int, state: dict, *, rank: int, keep_last: int,
                    write_parts: Callable[[Path], None], barrier: Callable[[], None]) -> Path:
    """The whole protocol, called on every rank: rank 0 prepares the temporary directory, every
    rank writes its parts (`write_parts(tmp)`, which also writes this rank's RNG file), rank 0
    commits. Returns the final directory."""
    tmp = Path(root) / f"{_TMP_PREFIX}{step_dirname(step)}"
    if rank == 0:
        begin(root, step)
    barrier()
    write_parts(tmp)
    write_json_atomic(rng_path(tmp, rank), rng_state())
    barrier()
    if rank == 0:
        commit(root, tmp, step, state, keep_last=keep_last)
    barrier()  # no rank starts the next step's save (or exits) before the commit is done
    return Path(root) / step_dirname(step)


# --------------------------------------------------------------------------- RNG states


def rng_path(ckpt: Path, rank: int) -> Path:
    path = Path(ckpt) / "rng" / f"rank-{rank:05d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _b64(t) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    """Python, numpy and torch (CPU and every CUDA device) RNG states as JSON-able values."""
    import torch

    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"name": np_name, "keys": np_keys.tolist(), "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "gauss": float(np_gauss)},
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def load_rng(ckpt: Path, rank: int) -> bool:
    """Restore this rank's RNG states from the checkpoint; False when it has none for this rank."""
    path = Path(ckpt) / "rng" / f"rank-{rank:05d}.json"
    if not path.is_file():
        return False
    set_rng_state(json.loads(path.read_text()))
    return True
