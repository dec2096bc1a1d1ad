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
export AOI OUT BEFORE AFTER RADIUS_M CONFIG SOURCE BEFORE_DATE AFTER_DATE OFFLINE

.PHONY: setup detect test bench eval train lint clean

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
	  $${AFTER_DATE:+--after-date "$$AFTER_DATE"} $${OFFLINE:+--offline}

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

eval: $(STAMP)
	$(BIN)/python -m pipeline.evaluate

train: $(STAMP)
	$(BIN)/python scripts/train.py

clean:
	rm -rf $(VENV) .pytest_cache
