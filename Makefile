# `make test` and `make demo` work on a fresh machine: they build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_PKG_DIR := /usr/share/datasets/fashion-mnist

.PHONY: test demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# One test file per worker (its module fixtures are built once), at most 4 workers: 3 to 5 minutes on 2 cores.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

demo: $(VENV)/.installed
	@bash examples/demo.sh

bench: $(VENV)/.installed
	$(PY) -m benchmarks.overhead

clean:
	rm -rf $(VENV) output *.egg-info
