# Set-up and checks. `make test` and `make demo` work on a fresh machine with only Python:
# they create .venv and install what they need.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest
EXTRAS  ?= cpu,legacy-keras,kfp,k8s,test,torch

.PHONY: setup test lint test-keras3 test-keras2 demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

lint: setup
	$(BIN)/ruff check hrnet components pipelines tests benchmarks
	$(BIN)/vermin -q --no-tips --violations -t=3.9- hrnet

# Everything under Keras 3 (TF 2.21), then the model and training tests again under
# legacy Keras 2 (tf-keras), which stands in for the Ascend image's TF 2.6 / Keras 2.
test-keras3: setup
	$(PYTEST) -q

test-keras2: setup
	TF_USE_LEGACY_KERAS=1 $(PYTEST) -q -m keras2

test: lint test-keras3 test-keras2

demo: setup
	$(BIN)/python -m pipelines run-local

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
