# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS := $(VENV)/tools
TOOLS_TRIED := $(VENV)/.deploy-tools-tried

.PHONY: demo test lint typecheck unit clean deploy-tools bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel first, where this machine has it, so nothing pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0 || $(BIN)/python -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/detector demo

test: $(STAMP) $(TOOLS_TRIED) lint typecheck
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check detector tests scripts deploy benchmarks
	$(BIN)/ruff format --check detector tests scripts deploy benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy detector

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# The short benchmark set (each script under about 3 minutes on two cores); each prints its
# settings and tables, and takes --help for the full grids. Results and commands:
# docs/performance.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/model_throughput.py
	$(BIN)/python benchmarks/window_memory.py
	$(BIN)/python benchmarks/end_to_end.py
	$(BIN)/python benchmarks/peers.py
	$(BIN)/python benchmarks/scale_out.py

# prometheus, promtool, alertmanager and amtool from Debian's packages, unpacked into .venv/tools
# (nothing is installed system-wide, no service starts). tests/unit/test_deploy.py and
# tests/integration/test_prometheus.py use them when they are here or on PATH, and skip with
# the reason when not. `make test` tries once per venv and carries on where apt is unavailable.
$(TOOLS_TRIED): $(STAMP)
	-$(MAKE) --no-print-directory deploy-tools
	touch $(TOOLS_TRIED)

deploy-tools:
	rm -rf $(TOOLS) && mkdir -p $(TOOLS)/debs
	cd $(TOOLS)/debs && apt-get download prometheus prometheus-alertmanager
	for deb in $(TOOLS)/debs/*.deb; do dpkg-deb -x "$$deb" $(TOOLS)/root; done
	rm -rf $(TOOLS)/debs
	$(TOOLS)/root/usr/bin/promtool --version | head -1

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
