#!/usr/bin/env bash
# GPU proof in one offline command, for the lent H200 (Python 3.12 at /opt/torch/.venv with torch 2.11
# CUDA 13, transformers, triton...; no registry, no Ray/DeepSpeed/megatron-core/pydantic/flash-attn).
#
#   bash tools/gpu_check.sh              on the GPU machine, with .gpu-wheelhouse/ carried
#   bash tools/gpu_check.sh --rehearse   here, on CPU: the same steps at tiny sizes in a Python 3.12
#                                        venv holding only packages the image has (cached in .gpu-rehearsal/)
#
# Build the wheelhouse first, here: bash tools/build_gpu_wheelhouse.sh. Installs use ONLY
# `pip install --no-index --find-links .gpu-wheelhouse` into a venv made with --system-site-packages
# from the preinstalled interpreter, so torch and the rest of the image are reused.
# Steps (each with its own timeout; a failed one does not stop the others):
#   venv, install-wheels, install-deepspeed (sdist, DS_BUILD_OPS=0, built against the image's torch),
#   install-distill (--no-deps --no-build-isolation), assets, env, gpu-tests (every gpu-marked test
#   whose module imports without Ray/vLLM), deepspeed (ZeRO-2/3 vs CPU fp32, resume, export),
#   megatron (TP=1 vs its CPU run), bench (tools/bench_gpu_train.py: ~1.5B Qwen2 shape at 4k and 16k
#   packed, DeepSpeed and Megatron vs the HF Trainer with padded batches).
# Writes OUT/summary.json (every step's pass/fail, seconds and figures) and OUT/logs.tar.gz, updated
# after every step; OUT is $OUT when set (the device tool's), else .gpu-check-out/ here.
# Budget on the H200: 470 s in all (GPU_CHECK_BUDGET_S), under the 8-minute target; each step's timeout is
# cut to what is left of it, so the command ends inside the device's 10 minutes whatever hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
HOUSE=$REPO/.gpu-wheelhouse
REHEARSE=0
[[ "${1:-}" == "--rehearse" ]] && REHEARSE=1

if (( REHEARSE )); then
  # The image's packages the check imports, at the image's versions where tools/gpu_image_packages.txt
  # gives them (torch 2.11.0 from PyPI is its CUDA build; it runs on CPU here). Everything else the
  # check needs must come from the wheelhouse, as on the device.
  REHEARSAL_PACKAGES=(torch transformers safetensors tokenizers huggingface-hub accelerate numpy pyarrow pyyaml
                      filelock tqdm pytest pytest-timeout psutil ninja einops msgpack py-cpuinfo nvidia-ml-py
                      packaging regex jinja2 setuptools wheel tensorboard)
  R=$REPO/.gpu-rehearsal
  BASE_PY=$R/image/bin/python
  PY312=
  for c in ${PYTHON312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do  # a pyenv shim may not run
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$c; break; fi
  done
  [[ -n $PY312 ]] || { echo "rehearsal: no Python 3.12 found (set PYTHON312)" >&2; exit 2; }
  want=$(for p in "${REHEARSAL_PACKAGES[@]}"; do grep -m1 -E "^${p}(==|$)" tools/gpu_image_packages.txt || echo "MISSING:$p"; done)
  if grep -q MISSING <<<"$want"; then echo "not in tools/gpu_image_packages.txt: $want" | grep MISSING >&2; exit 2; fi
  # setuptools<82: torch 2.11's own pin.
  want=$(sed 's/^setuptools$/setuptools<82/' <<<"$want")
  if [[ ! -x $BASE_PY ]] || [[ "$(cat "$R/image.txt" 2>/dev/null)" != "$want" ]]; then
    echo "rehearsal: building the stand-in image venv $R/image (Python 3.12, once; ~5 GB with torch's CUDA libraries)"
    rm -rf "$R/image" && "$PY312" -m venv "$R/image" && "$R/image/bin/pip" install -q $want && echo "$want" > "$R/image.txt" \
      || { echo "rehearsal: could not build $R/image" >&2; exit 2; }
  fi
  # Dependencies pip pulled in that the image does not list (pydantic, via one of the above) go:
  # the stand-in holds only what the image has, so the wheelhouse must bring the rest.
  extra=$("$BASE_PY" - tools/gpu_image_packages.txt <<'PYEOF'
import importlib.metadata as md, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
listed = {norm(ln.strip().split("==")[0]) for ln in open(sys.argv[1]) if ln.strip() and not ln.startswith("#")}
print(" ".join(sorted({norm(d.metadata["Name"]) for d in md.distributions()} - listed - {"pip"})))
PYEOF
)
  [[ -z $extra ]] || "$R/image/bin/pip" uninstall -q -y $extra
  OUT=${OUT:-$R/out}
  WORK=$R/work
  SIZE=(--tiny)
  SCALE=6 BUDGET_S=${GPU_CHECK_BUDGET_S:-3000}   # 2 CPU cores: every step is slower than on the device
else
  BASE_PY=${BASE_PYTHON:-/opt/torch/.venv/bin/python3}
  [[ -x $BASE_PY ]] || BASE_PY=$(command -v python3)
  OUT=${OUT:-$REPO/.gpu-check-out}
  WORK=${TMPDIR:-/tmp}/distill-gpu-check
  SIZE=()
  SCALE=1 BUDGET_S=${GPU_CHECK_BUDGET_S:-470}    # under 8 minutes, inside the device's 10 per command
fi
START=$(date +%s)
[[ -d $HOUSE ]] || { echo "no $HOUSE: run bash tools/build_gpu_wheelhouse.sh here (with registry access) and carry it" >&2; exit 2; }

rm -rf "$WORK" "$OUT/summary.json" "$OUT/logs.tar.gz"
mkdir -p "$WORK/logs" "$WORK/results" "$OUT"
VENV=$WORK/venv
PY=$VENV/bin/python
# The checks' own home: the tokenizer goes where distill looks for the packaged SmolLM2
# (~/.cache/distill/models), without touching this user's cache; no Hub is reachable.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(dirname "$WORK")/torch_extensions} HOME=$WORK/home HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONFIG_FILE=/dev/null   # nothing is fetched, here either

# step NAME TIMEOUT_S CMD...: runs CMD, its output to logs/NAME.log (and, for checks printing a JSON
# line, results/NAME.json), records pass/fail and seconds, refreshes the summary. The timeout is cut
# to what is left of BUDGET_S; a step with under 15 s left is recorded as not run.
step() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) )) t0 rc ms
  (( limit > left )) && limit=$left
  t0=$(date +%s%N)
  echo "== $name (timeout ${limit}s)"
  if (( limit < 15 )); then
    rc=125; echo "not run: the ${BUDGET_S} s budget is spent" > "$WORK/logs/$name.log"
  else
    timeout -k 10 "$limit" "$@" > "$WORK/results/$name.json" 2> "$WORK/logs/$name.log"
    rc=$?
    cat "$WORK/results/$name.json" >> "$WORK/logs/$name.log"
  fi
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '{"step": "%s", "ok": %s, "rc": %d, "timed_out": %s, "seconds": %d.%03d, "timeout_s": %d}\n' "$name" \
    "$([[ $rc == 0 ]] && echo true || echo false)" "$rc" "$([[ $rc == 124 || $rc == 137 ]] && echo true || echo false)" \
    $(( ms / 1000 )) $(( ms % 1000 )) "$limit" >> "$WORK/steps.jsonl"
  "$BASE_PY" tools/gpu_check.py summarize "$WORK" "$OUT" | tail -n 1
  echo "   rc=$rc; log tail:"; tail -n 3 "$WORK/logs/$name.log" | cut -c1-300 | sed 's/^/   /'
}

assets() {
  local tok=$HOME/.cache/distill/models/smollm2-135m-instruct-0.1.2
  mkdir -p "$tok" && cp "$HOUSE"/assets/smollm2-135m-instruct/* "$tok"/ || return 1
  # The tests read ../shared/data beside the repository; it does not travel to the device.
  if [[ ! -f ../shared/data/train/gsm8k_train.jsonl ]]; then
    mkdir -p ../shared/data/train && cp "$HOUSE/assets/gsm8k_train.jsonl" ../shared/data/train/ || return 1
  fi
  ls -la "$tok" ../shared/data/train
}

# Offline installs: --no-index everywhere (PIP_NO_INDEX too), only the carried wheelhouse.
# The image's interpreter is itself a venv (/opt/torch/.venv): --system-site-packages alone would
# expose the Python under it, not the venv's torch. A .pth file adds the image venv's site-packages
# after the new venv's own, so the wheelhouse's packages come first and pip counts the image's as installed.
make_venv() {
  "$BASE_PY" -m venv --system-site-packages "$VENV" || return 1
  local own base
  own=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  base=$("$BASE_PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' | sort -u)
  echo "$base" > "$own/image-site-packages.pth"
  "$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
}
export -f make_venv assets
export BASE_PY VENV HOUSE
step venv 30 bash -c make_venv
step install-wheels 60 "$PY" -m pip install --no-index --find-links "$HOUSE" \
  -r <(grep -v '^deepspeed' "$HOUSE/requirements.txt")
step install-deepspeed 150 env DS_BUILD_OPS=0 "$PY" -m pip install --no-index --find-links "$HOUSE" \
  --no-build-isolation "$(grep '^deepspeed' "$HOUSE/requirements.txt")"
step install-distill 60 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$REPO"
step assets 10 bash -c assets
step env 45 "$PY" tools/gpu_check.py env
# Every gpu-marked test of modules that need neither Ray nor vLLM (skipped without CUDA: in the
# rehearsal this proves they import and collect).
step gpu-tests 120 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_attention.py tests/test_packing.py \
  tests/test_megatron_gpu.py
step deepspeed 150 "$PY" tools/gpu_check.py deepspeed "${SIZE[@]}" --work "$WORK"
step megatron 60 "$PY" tools/gpu_check.py megatron "${SIZE[@]}" --work "$WORK"
step bench 180 "$PY" tools/bench_gpu_train.py "${SIZE[@]}" --budget-s $(( 170 * SCALE )) --work "$WORK/bench"

echo
echo "== summary: $OUT/summary.json"
"$BASE_PY" - "$OUT/summary.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
for st in s["steps"]:
    print(f"  {st['step']:<18} {'ok  ' if st['ok'] else 'FAIL'} {float(st['seconds']):7.1f} s"
          + ("  (timed out)" if st["timed_out"] else ""))
print(f"  {s['passed']} passed, {s['failed']} failed, {s['wall_s']} s")
PYEOF
failed=$("$BASE_PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['failed'])" "$OUT/summary.json")
exit $(( failed > 0 ))
