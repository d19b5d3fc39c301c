# Two set-up commands: `make demo` (install + run the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo test lint clean bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU wheel first, so that no dependency pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m adamerge +experiment=quickstart

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check adamerge tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun

bench: install
	bash benchmarks/run_all.sh
