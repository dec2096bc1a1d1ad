# Sitewatch. `make detect` and `make test` set themselves up on a fresh machine.
# User values (AOI, BEFORE, ...) reach the command through the environment ("$$AOI"), never
# pasted into the shell line, so `make detect AOI='1,2; rm -rf ~'` is only a bad AOI.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

AOI      ?= dabancheng
OUT      ?= out
BEFORE   ?=
AFTER    ?=
RADIUS_M ?=
CONFIG   ?=
SOURCE   ?=
BEFORE_DATE ?=
AFTER_DATE  ?=
OFFLINE  ?=
BENCH_ARGS ?=
# make watch: SITES (watch file), SCHEDULER (local, sync, tcp://host:8786), FORCE=1, JSON=1
SITES     ?=
SCHEDULER ?=
FORCE     ?=
JSON      ?=
BENCH_WATCH_ARGS ?=
export AOI OUT BEFORE AFTER RADIUS_M CONFIG SOURCE BEFORE_DATE AFTER_DATE OFFLINE
export SITES SCHEDULER FORCE JSON
# $(call switch,NAME,--flag): --flag when NAME is set to anything but empty, 0, no, false or
# off (lower case, Capitalized or UPPER); only the literal flag reaches the shell, never the value
OFF_WORDS = 0 n N no No NO false False FALSE off Off OFF
switch = $(if $(filter-out $(OFF_WORDS),$(strip $($(1)))),$(2))

.PHONY: setup detect test check lint typecheck bench bench-coreg eval train train-cnn clean watch bench-watch

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

detect: $(STAMP)
	@$(BIN)/sitewatch detect --aoi "$$AOI" --out "$$OUT" \
	  $${BEFORE:+--before "$$BEFORE"} $${AFTER:+--after "$$AFTER"} \
	  $${RADIUS_M:+--radius-m "$$RADIUS_M"} $${CONFIG:+--config "$$CONFIG"} \
	  $${SOURCE:+--source "$$SOURCE"} $${BEFORE_DATE:+--before-date "$$BEFORE_DATE"} \
	  $${AFTER_DATE:+--after-date "$$AFTER_DATE"} $(call switch,OFFLINE,--offline)

# Exit codes: 0 nothing new, 3 new findings, 4 some sites failed, 5 both, 2 config error.
watch: $(STAMP)
	@$(BIN)/sitewatch watch --out "$$OUT" $${SITES:+--sites "$$SITES"} \
	  $${CONFIG:+--config "$$CONFIG"} $${SCHEDULER:+--scheduler "$$SCHEDULER"} \
	  $(call switch,FORCE,--force) $(call switch,OFFLINE,--offline) $(call switch,JSON,--json)

bench-watch: $(STAMP)
	$(BIN)/python scripts/bench_watch.py $(BENCH_WATCH_ARGS)

# `make test` (the README's test command, run by .ci/run) is the whole check: ruff, mypy, then
# pytest. PYTEST_ARGS narrows the pytest part, e.g. make test PYTEST_ARGS="tests/core -x".
PYTEST_ARGS ?=

test: check

check: lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# files, cache folder and the untyped libraries are in pyproject.toml [tool.mypy]
typecheck: $(STAMP)
	$(BIN)/mypy

# The detect benchmark, then the co-registration comparison; each script rewrites only its own
# sections of docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)
	$(MAKE) --no-print-directory bench-coreg

# Co-registration against AROSICS, which runs in its own environment beside the project
# (made here from Debian's python3-gdal when missing; never a dependency of Sitewatch).
AROSICS_VENV ?= $(abspath ..)/arosics-venv
BENCH_COREG_ARGS ?=

bench-coreg: $(STAMP)
	$(BIN)/python scripts/bench_coreg.py --setup --arosics-venv "$(AROSICS_VENV)" $(BENCH_COREG_ARGS)

eval: $(STAMP)
	$(BIN)/python -m pipeline.evaluate

train: $(STAMP)
	$(BIN)/python scripts/train.py

# The network needs PyTorch to train (not to run): the ".[train]" extra pins the release
# this project was trained with.
train-cnn: $(STAMP)
	$(BIN)/pip install --quiet -e ".[train]"
	$(BIN)/python scripts/train_cnn.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
