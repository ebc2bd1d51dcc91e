# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test

.PHONY: demo test setup clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The demo needs the runtime only; the tests add pytest and torch (the parity reference).
# Both install under launch/constraints.txt, the stack the TPU VMs get, so a new upstream release
# changes neither what CI tests nor what a pod runs until the pins are moved on purpose.
CONSTRAINTS := launch/constraints.txt
$(RUNTIME): $(PY) setup.py requirements.txt $(CONSTRAINTS)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e .
	touch $(RUNTIME)

$(TESTING): $(RUNTIME) setup.py $(CONSTRAINTS)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $(TESTING)

setup: $(TESTING)

demo: $(RUNTIME)
	$(PY) -m countclip_jax.demo $(ARGS)

# --durations: the slowest tests, so the suite can be kept near its ~10 min budget. Whole test
# files go to the two workers, heaviest first (tests/conftest.py's HEAVIEST_FIRST).
test: $(TESTING)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
