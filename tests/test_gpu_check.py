"""tools/gpu_check.sh can run offline on the lent GPU machine: it installs only from the carried
wheelhouse, the rehearsal installs only packages the image has, and every third-party module the
check's code imports is in the image, in the wheelhouse, or named here as not needed by the
check (with why). Static reads of the scripts and sources: fast, no network."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

CHECK = (REPO / "tools" / "gpu_check.sh").read_text()
BUILDER = (REPO / "tools" / "build_gpu_wheelhouse.sh").read_text()

# What the check runs: its Python steps and the test modules it hands to pytest (and their helpers).
ENTRY = ["tools/gpu_check.py", "tools/bench_gpu_train.py", "tools/bench_megatron.py", "tests/train_probe.py",
         "tests/megatron_probe.py", "tests/conftest.py", "tests/ci_guard.py", "tests/test_attention.py",
         "tests/test_packing.py", "tests/test_megatron_gpu.py", "tests/test_train_data.py"]

NOT_NEEDED = {
    "ray": "launcher `ray` and Ray tokenising only; the check launches with torchrun / local",
    "flash-attn": "optional kernel: without it the packed attention uses FlexAttention",
    "wandb": "optional metric sink, off unless configured",
    "mlflow": "optional metric sink, off unless configured",
    "datasets": "Hub benchmark/source loading in curation, which the check does not run",
    "datasketch": "near-duplicate search in curation, which the check does not run",
    "math-verify": "answer verification in curation, which the check does not run",
}
DIST_OF = {"yaml": "pyyaml", "megatron": "megatron-core", "flash_attn": "flash-attn", "math_verify": "math-verify"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = (REPO / "tools" / "gpu_image_packages.txt").read_text().splitlines()
    return {norm(ln.split("==")[0]) for ln in lines if ln.strip() and not ln.startswith("#")}


def wheelhouse_packages() -> set[str]:
    block = re.search(r"WHEELS=\((.*?)\)", BUILDER, re.S).group(1) + re.search(r"SDISTS=\((.*?)\)", BUILDER).group(1)
    return {norm(s.split("==")[0]) for s in re.findall(r'"([^"]+)"', block)}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere (lazy imports too) in ENTRY and every
    distill module they reach, -> the files importing them."""
    def module_file(name: str) -> Path | None:
        base = REPO / Path(*name.split("."))
        for p in (base.with_suffix(".py"), base / "__init__.py"):
            if p.is_file():
                return p
        return None

    seen, todo, found = set(), [REPO / e for e in ENTRY], {}
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top == "distill":
                    if (p := module_file(n)) is not None:
                        todo.append(p)
                elif not (top in sys.stdlib_module_names or (REPO / "tests" / f"{top}.py").exists()
                          or (REPO / "tools" / f"{top}.py").exists()):
                    found.setdefault(DIST_OF.get(top, norm(top)), set()).add(str(f.relative_to(REPO)))
    return found


def test_installs_use_only_the_wheelhouse():
    installs = [ln for ln in CHECK.splitlines() if "pip install" in ln and not ln.lstrip().startswith("#")]
    # The rehearsal's stand-in image is the one install that reaches a registry (before PIP_NO_INDEX).
    device = [ln for ln in installs if "$R/image/bin/pip" not in ln]
    assert len(device) == 3, device  # wheels, DeepSpeed, distill
    assert all("--no-index" in ln for ln in device), device
    assert "export PIP_NO_INDEX=1" in CHECK
    assert "--system-site-packages" in CHECK and "DS_BUILD_OPS=0" in CHECK
    assert re.search(r"pip install --no-index --no-deps --no-build-isolation -e", CHECK)
    assert "ray" not in wheelhouse_packages()


def test_rehearsal_installs_only_image_packages():
    listed = re.search(r"REHEARSAL_PACKAGES=\((.*?)\)", CHECK, re.S).group(1).split()
    assert set(map(norm, listed)) <= image_packages()


def test_every_import_of_the_check_is_in_the_image_or_the_wheelhouse():
    have = image_packages() | wheelhouse_packages() | {"deepspeed", "megatron-core"}
    missing = {d: sorted(files) for d, files in third_party_imports().items() if d not in have and d not in NOT_NEEDED}
    assert not missing, f"imported by the GPU check's code but neither in the image nor in the wheelhouse: {missing}"
    assert {"deepspeed", "megatron-core", "pydantic"} <= wheelhouse_packages()


def test_the_not_needed_ones_are_not_imported_by_the_trainer():
    # They are imported lazily (inside the functions that need them): loading the trainer, the
    # launcher, both backends' modules and the exporter must not pull any of them in.
    code = ("import sys, distill.train.loop, distill.train.launch, distill.train.torchrun, distill.export.hf, "
            "distill.train.backends.deepspeed, distill.config\n"
            f"print(sorted(m for m in {sorted(t.replace('-', '_') for t in NOT_NEEDED)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
