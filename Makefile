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

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gptoss_tune.demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup tests

clean:
	rm -rf $(VENV) runs out .pytest_cache
