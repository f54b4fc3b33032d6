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
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	# hqq only for tests/test_format_refused.py's child interpreter: once importable, every
	# `import transformers` imports it. An sdist whose build compiles CUDA kernels unless DISABLE_CUDA=1.
	DISABLE_CUDA=1 $(BIN)/python -m pip install --quiet --upgrade --no-deps --target $(VENV)/hqq-only \
		hqq==0.2.8.post1 einops==0.8.2 termcolor==3.3.0
	# GPTQModel only for tests/test_format_gptq_awq.py's child interpreter (its import patches
	# safetensors and transformers): --no-deps, its requirements pull a CUDA torch; these are the
	# modules its packers and torch kernels import.
	$(BIN)/python -m pip install --quiet --upgrade --no-deps --target $(VENV)/gptqmodel-only \
		gptqmodel==7.7.0 pypcre==0.6.4 logbar==0.4.15 device-smi==0.5.7 tokenicer==0.0.14 defuser==0.0.28 \
		threadpoolctl==3.8.0 pillow==13.0.0 requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3
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
