# The two commands of the README: `make demo` and `make test`. Both create .venv on first use. `make bench` reruns the
# benchmarks whose numbers docs/ shows (hours; never part of `make test`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FIXTURES := models/tiny-qwen3-moe models/tiny-deepseek-v3

.PHONY: install demo test fixtures bench bench-results bench-pruning bench-performance bench-distributed bench-scale \
	bench-architectures clean

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

# Each page's benchmarks, with the commands the page prints beside its numbers (bench/results/*.json hold them too).
# Many hours on a 2-core machine, most of it the claim (several minutes per size point); bench-scale needs a cgroup
# it may write (root) and a few GB of disk. One page at a time: e.g. `make bench-performance`.
bench: bench-results bench-pruning bench-performance bench-distributed bench-scale bench-architectures

bench-results: install  # docs/results.md (in-domain), docs/results-bundled.md (five domains) and their plots
	$(BIN)/python bench/claim.py
	$(BIN)/python bench/claim.py --calib-text bundled

bench-pruning: install  # docs/pruning.md (domain.py rewrites its section)
	$(BIN)/python bench/prune.py
	$(BIN)/python bench/domain.py --domains code dialogue bundled
	$(BIN)/python bench/merge.py

bench-performance: install  # docs/performance.md (sensitivity.py rewrites its section)
	$(BIN)/python bench/quantize_speed.py
	$(BIN)/python bench/quantize_speed.py --v3-layer --types Q4_K --repeats 3
	$(BIN)/python bench/quantize_speed.py --v3-layer --types IQ2_XXS --repeats 2
	$(BIN)/python bench/sensitivity.py --models models/tiny-deepseek-v3 models/tiny-qwen3-moe --sens-tokens 512
	$(BIN)/python bench/sensitivity.py --compress-only --models models/tiny-deepseek-v3 models/tiny-qwen3-moe \
		--calib-tokens 50000 --sens-tokens 4096 --seq-len 512 --eval-tokens 0
	$(BIN)/python bench/distributed_cost.py --v3-layer
	nice $(BIN)/python bench/probe_tokens.py --models models/tiny-deepseek-v3
	$(BIN)/python bench/probe_tokens.py --calib-text data/calib/stories.txt
	nice $(BIN)/python bench/fast_sample.py
	nice $(BIN)/python bench/reference.py --model models/tiny-deepseek-v3 --bpw 2.5 3.5
	nice $(BIN)/python bench/reference.py --model models/tiny-deepseek-v3 --bpw 2.5 --bases IQ2_XXS \
		--out bench/results/reference-iq2_xxs.json
	$(BIN)/python bench/speed.py

bench-distributed: install  # docs/distributed.md
	$(BIN)/python bench/distributed_cost.py

bench-scale: install  # docs/scale.md
	$(BIN)/python bench/scale.py --layers 3 5 --cap-gib 5.5 --json bench/results/scale.json
	$(BIN)/python bench/scale.py --fp8 --layers 3 --cap-gib 5.5 --json bench/results/scale-fp8.json
	$(BIN)/python bench/scale.py --threads-only

bench-architectures: install  # docs/architectures.md (runs the family tests for their JUnit report)
	$(BIN)/python bench/architectures.py

fixtures: install
	cd scripts && ../$(BIN)/python train_fixtures.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
