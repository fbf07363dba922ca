# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it (once; re-run when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On the CPU machines this pins the CPU torch wheel; set CONSTRAINTS= to install a CUDA torch.
CONSTRAINTS ?= constraints-cpu.txt
PYTEST_WORKERS ?= 2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint test-oldest install clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	# DeepSpeed builds from source and imports torch while doing so: without build isolation it sees the torch
	# just installed (an isolated build would fetch another, multi-GB one). If it cannot install here, the
	# DeepSpeed tests of tests/train/test_distributed.py skip and say so; DDP and FSDP2 never need it.
	$(PY) -m pip install -q setuptools wheel
	$(PY) -m pip install -q --no-build-isolation $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) 'deepspeed>=0.16,<0.20' \
		|| echo "note: deepspeed did not install; the DeepSpeed tests will skip"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gptoss_tune.demo

# `make test` lints first (ruff: pyproject.toml [tool.ruff]), then runs the suite.
lint: $(STAMP)
	$(VENV)/bin/ruff check gptoss_tune kernels tests scripts
	$(VENV)/bin/ruff format --check gptoss_tune kernels tests scripts

test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup tests

# The suite against the oldest transformers/PEFT/Triton we admit (constraints-oldest.txt), in its own venv.
# Not part of `make test`: run it when touching code that reaches into those libraries.
OLDEST := .venv-oldest
$(OLDEST)/.installed: pyproject.toml constraints-oldest.txt $(CONSTRAINTS)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -c constraints-oldest.txt -e '.[dev]'
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup tests

clean:
	rm -rf $(VENV) $(OLDEST) runs out .pytest_cache
