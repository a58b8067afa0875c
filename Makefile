# Two commands on a fresh machine:
#   make demo   set everything up and run the detector on a simulated day (no services)
#   make test   set everything up (Python deps, Java + Kafka jars, Prometheus, PostgreSQL, Chromium)
#               and run every check
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup setup-services lint unit integration soak bench clean

# (setup.py builds the C extensions: an edited .c file is rebuilt by the next make)
$(STAMP): pyproject.toml setup.py $(wildcard detector/core/*.c)
	bash tools/build/install.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/detector demo

setup-services:
	bash tools/kafka/kafka.sh install
	bash tools/prometheus/install.sh
	bash tools/postgres/install.sh
	bash tools/chromium/install.sh

lint: setup
	$(BIN)/ruff check detector tests bench
	$(BIN)/mypy

test: setup setup-services lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit tests/stream

integration: setup setup-services
	$(BIN)/python -m pytest -q -p no:cacheprovider -m integration

# Fault injection, long: more requests and 3 rounds per fault (make test runs the short version).
soak: setup setup-services
	DETECTOR_SOAK=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m faults

bench: setup setup-services
	$(BIN)/python bench/bench_replay.py
	$(BIN)/python bench/bench_replay_floor.py
	$(BIN)/python bench/bench_backtest.py
	$(BIN)/python bench/bench_sink.py
	$(BIN)/python bench/bench_parse.py
	$(BIN)/python bench/bench_scoring.py
	$(BIN)/python bench/bench_stream.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
