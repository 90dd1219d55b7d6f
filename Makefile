# griffon: two commands.
#   make run    install, then train the default model on the embedded corpus and sample from it
#   make test   install with test dependencies, lint, run the test suite
#   make gpu-check  on a machine with a CUDA GPU: the GPU tests, then `griffon bench gpu` (docs/gpu.md)
#
# torch is pinned to the 2.13.0 release: on the project's CPU machines pip takes a local CPU wheel;
# elsewhere pip picks the build for your platform (CUDA on Linux). Install another torch first
# and set TORCH= (empty) to keep it.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test install install-test lint clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(if $(TORCH),$(PIP) install "$(TORCH)")
	$(PIP) install -e .

install-test: install
	$(PIP) install -e ".[test]"
	# The DeepMind reference port, without its JAX/flax half (tests import only recurrentgemma.torch).
	$(PIP) install --no-deps recurrentgemma==1.0.1

run: install
	$(VENV)/bin/griffon train --out $(RUN)
	$(VENV)/bin/griffon sample $(RUN) --prompt "ROMEO:" --max-new-tokens 300 --seed 0

lint: $(PY)
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments
	$(VENV)/bin/lint-imports  # the layers contract in pyproject.toml

test: install-test lint
	$(PY) -m pytest -q

GPU_RESULTS ?= docs/results/gpu

gpu-check: install-test
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA GPU')"
	$(PY) -m pytest -q tests/test_gpu_kernels.py tests/test_decode_steps.py tests/test_attention.py tests/test_model.py tests/test_bench.py
	$(VENV)/bin/griffon bench gpu --json $(GPU_RESULTS).json --png $(GPU_RESULTS).png

clean:
	rm -rf $(VENV) runs .pytest_cache
