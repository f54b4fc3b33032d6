# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Installed first and pinned: on these machines it is the CPU wheel on disk; a plain `torch`
# requirement would pull a CUDA build of several GB.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.qfinal-installed

export HF_HUB_OFFLINE := 1

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/qfinal load demo

# The layers contract (pyproject.toml) and ruff run before the suite: a broken layer fails `make test`.
lint: install
	$(BIN)/ruff check qfinal tests bench
	$(BIN)/ruff format --check qfinal tests bench
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
