# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FIXTURES := models/tiny-qwen3-moe models/tiny-deepseek-v3

.PHONY: install demo test fixtures bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch first (from local disk): a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# llama-cpp-python compiles llama.cpp on first install (about 7 minutes on 2 cores; pip caches the wheel).
	# The ray extra too: tests/test_distributed.py runs the Ray backend on a local 2-CPU cluster; the serve extra:
	# tests/test_serve.py starts llama-cpp-python's OpenAI-compatible server.
	$(BIN)/python -m pip install -q -e '.[test,ray,serve]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/python -m pytest -q

fixtures: install
	cd scripts && ../$(BIN)/python train_fixtures.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
