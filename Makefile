# drip: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch: a plain `torch` would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST := -m pytest -q -n auto --dist worksteal

.PHONY: install demo test test-oldest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

# One pytest-xdist worker per core (each with its share of torch's threads, tests/conftest.py):
# on 2 cores the suite took 3.0-4.3 minutes instead of 6.5 serially, and 5.1-6.3 on a slower one.
test: install
	$(BIN)/python $(PYTEST)

# The suite at the lowest versions pyproject.toml allows (scripts/oldest_versions.py reads them
# from it), in an environment of its own; not part of `make test`: run it when a bound changes.
OLD_VENV ?= .venv-oldest
test-oldest:
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLD_VENV)/bin/python scripts/oldest_versions.py > $(OLD_VENV)/oldest.txt
	$(OLD_VENV)/bin/python -m pip install --quiet --only-binary=:all: "$(TORCH_PIN)" \
		-r $(OLD_VENV)/oldest.txt
	$(OLD_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(OLD_VENV)/bin/python $(PYTEST) -p no:cacheprovider

bench: install
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) $(OLD_VENV) demo_out bench_out
