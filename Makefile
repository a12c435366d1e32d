# Every target sets itself up: the first run creates .venv and installs the project.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test test-unit test-property test-sim test-vectors test-system test-netbed fuzz bench demo vectors schemas clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The README's test command. Tiers run one after another so .ci/run can time them.
test: $(STAMP)
	$(BIN)/python tools/run_tiers.py

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-property: $(STAMP)
	$(BIN)/python -m pytest -q tests/property

test-sim: $(STAMP)
	$(BIN)/python -m pytest -q tests/sim

test-vectors: $(STAMP)
	$(BIN)/python -m pytest -q tests/vectors

test-system: $(STAMP)
	$(BIN)/python -m pytest -q tests/system

# Network test bed (tools/netbed): Linux network namespaces, so it needs root.
test-netbed: $(STAMP)
	$(BIN)/python -m pytest -q tests/netbed

# Long fuzzing run (>= 10^5 inputs per mode) with branch coverage of p2pfleet/wire.
fuzz: $(STAMP)
	$(BIN)/python tools/fuzz_wire.py --inputs 100000 --coverage

bench: $(STAMP)
	$(BIN)/python tools/bench_wire.py

# Regenerate protocol/ from the code (tests fail when they drift apart).
schemas: $(STAMP)
	$(BIN)/python tools/gen_protocol.py

demo: $(STAMP)
	$(BIN)/python tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
