PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test lint demo bench wheel-check

install:
	$(PIP) install -q torch torchvision
	$(PIP) install -q -e '.[dev]'

test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider --timeout 600

lint:
	$(PYTHON) -m ruff check explora tests benchmarks

demo: install
	$(PYTHON) -m explora demo --out demo-out

bench: install
	$(PYTHON) benchmarks/run_all.py --out bench-out

# The wheel alone: build it, install it into a clean venv (not this checkout), run the CLI and a tiny pre-training.
wheel-check:
	PYTHON=$(PYTHON) bash .ci/wheel-check
