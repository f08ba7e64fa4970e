"""Training checkpoints: atomic directories, a `latest` pointer, the last K kept, RNG in JSON.

Layout of `checkpoints/`:

    step-00000200/          one complete checkpoint
      ds/                   the backend's files (model, optimizer, scheduler; per rank)
      hf/                   config, tokenizer, chat template, generation config (for export)
      rng/rank-00000.json   each rank's python / numpy / torch RNG states
      trainer_state.json    step (the data cursor: an index into the StepPlan) and what the
                            plan depends on, checked on resume
      manifest.json         size and sha256 of every file above, written last
    latest                  "step-00000200", replaced atomically

A checkpoint is written into `.tmp-step-...`, and renamed once every rank's files are there;
`latest` is written to a temporary file and renamed after that. A crash at any point leaves
either the previous `latest` or the new one, never a pointer to a partial directory. The
directory must be on storage every rank sees (the local disk on one machine).

Renames protect against a crash, not against storage that loses or flips bytes later (a full
disk, a flaky network filesystem, a copy cut short). Resume therefore goes through
`latest_good_checkpoint`, which checks the manifest and falls back to the newest checkpoint that
matches it, with a warning naming what was wrong.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from distill.fsio import atomic_write_json, atomic_write_text, replace_dir, sha256_file

LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


def step_dirname(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


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


def commit(root: Path, tmp: Path, step: int, state: dict, *, keep_last: int, checksums: bool = True) -> Path:
    """Finish a checkpoint every rank has written into `tmp` (call on one rank): state file,
    manifest, rename, `latest`, then delete all but the newest `keep_last`."""
    root = Path(root)
    atomic_write_json(Path(tmp) / STATE_FILE, {**state, "step": step}, indent=1, sort_keys=True)
    atomic_write_json(Path(tmp) / MANIFEST, build_manifest(Path(tmp), checksums=checksums), indent=1, sort_keys=True)
    # Over an existing one when the same step is saved again (a resumed run that stopped at once).
    final = replace_dir(tmp, root / step_dirname(step))
    write_json_pointer(root, final.name)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_json_pointer(root: Path, name: str) -> None:
    atomic_write_text(root / LATEST, name + "\n")


def save_checkpoint(root: Path, step: int, state: dict, *, rank: int, keep_last: int,
                    write_parts: Callable[[Path], None], barrier: Callable[[], None], checksums: bool = True) -> Path:
    """The whole protocol, called on every rank: rank 0 prepares the temporary directory, every
    rank writes its parts (`write_parts(tmp)`, which also writes this rank's RNG file), rank 0
    commits. Returns the final directory."""
    tmp = Path(root) / f"{_TMP_PREFIX}{step_dirname(step)}"
    if rank == 0:
        begin(root, step)
    barrier()
    write_parts(tmp)
    atomic_write_json(rng_path(tmp, rank), rng_state(), indent=1, sort_keys=True)
    barrier()
    if rank == 0:
        commit(root, tmp, step, state, keep_last=keep_last, checksums=checksums)
    barrier()  # no rank starts the next step's save (or exits) before the commit is done
    return Path(root) / step_dirname(step)


# --------------------------------------------------------------------------- integrity


def build_manifest(ckpt: Path, *, checksums: bool) -> dict:
    """Size (and sha256) of every file under `ckpt` but the manifest itself."""
    files = {}
    for p in sorted(Path(ckpt).rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            entry: dict = {"size": p.stat().st_size}
            if checksums:
                entry["sha256"] = sha256_file(p)
            files[p.relative_to(ckpt).as_posix()] = entry
    return {"files": files}


def verify_checkpoint(ckpt: Path, *, checksums: bool = True) -> list[str]:
    """What is wrong with a checkpoint against its manifest (empty: it is intact). Sizes are
    checked first (cheap, and a truncated file is the common case); sha256 only with
    `checksums` and where the manifest has one."""
    ckpt = Path(ckpt)
    path = ckpt / MANIFEST
    if not path.is_file():
        return [f"no {MANIFEST} (it is written last: the save did not finish, or the checkpoint predates manifests)"]
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [f"{MANIFEST} is unreadable"]
    problems = []
    for rel, entry in files.items():
        p = ckpt / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != entry["size"]:
            problems.append(f"{rel} has {p.stat().st_size} bytes, the manifest says {entry['size']} (truncated or "
                            "overwritten)")
        elif checksums and "sha256" in entry and sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel} does not match its sha256 in the manifest (corrupted)")
    return problems


def latest_good_checkpoint(root: Path, *, checksums: bool = True,
                           warn: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint: the one `latest` names, else older ones newest first, each
    checked against its manifest; `warn` is told what was wrong with every one skipped. None when
    there is no checkpoint; an error when there are some and none is intact (starting over
    silently would throw the run away)."""
    root = Path(root)
    pointer = root / LATEST
    candidates = list(reversed(list_checkpoints(root)))
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        else:
            warn(f"checkpoint: {pointer} names {named.name}, which is missing or incomplete")
    rejected = []
    for ckpt in candidates:
        problems = verify_checkpoint(ckpt, checksums=checksums)
        if not problems:
            return ckpt
        rejected.append(f"{ckpt.name}: " + "; ".join(problems))
        warn(f"checkpoint: {ckpt} is unusable, trying an older one: " + "; ".join(problems))
    if rejected:
        raise RuntimeError(f"no intact checkpoint in {root} (" + " | ".join(rejected) + "): restore one from a "
                           "copy, or delete the directory to start over")
    return None


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
