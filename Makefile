# Quickstart: `make demo` (the whole job on a built-in image set) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
AIRFLOW_VENV ?= .venv-airflow

.PHONY: install test demo bench lint lock clean airflow test-airflow

install: $(VENV)/.installed

# The lock constrains the install, so this venv, the Dataflow workers and the images
# run the same versions whatever the registry has published since the lock was made.
$(VENV)/.installed: pyproject.toml deploy/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]' -c deploy/requirements.txt
	touch $@

# Re-resolve the dependencies to today's newest releases in a scratch venv and rewrite
# the lock from it (then `make install` moves .venv onto the new pins).
LOCK_VENV ?= .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet -e '.[dev]'
	$(LOCK_VENV)/bin/python -m pipelines.cloud.packaging lock
	rm -rf $(LOCK_VENV)

# Two test processes by default: much of the suite waits on subprocesses (pipelines,
# trainers, the storage emulator), so two share even a 2-core machine well. Each file runs
# whole in one process (--dist loadfile), so module fixtures are built once.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20

demo: install
	$(PY) -m tests.support.demo

bench: install
	$(PY) -m tests.benchmarks.run

lint: install
	$(VENV)/bin/ruff check .

# Airflow gets a venv of its own: its Google provider and the project's tfx-bsl need
# google-api-python-client on opposite sides of 2.0. The DAG runs the project's
# commands with $(VENV)'s interpreter (deploy/airflow/dags/retrain_dag.py).
airflow: $(AIRFLOW_VENV)/.installed

$(AIRFLOW_VENV)/.installed: deploy/airflow/requirements.txt deploy/airflow/constraints.txt
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install --quiet -r deploy/airflow/requirements.txt \
		-c deploy/airflow/constraints.txt
	touch $@

# One retraining tick through `airflow dags test` (SQLite in a temporary AIRFLOW_HOME).
# Not part of `make test`: installing Airflow takes minutes.
test-airflow: install airflow
	IMAGEBEAM_AIRFLOW_TEST=1 $(PY) -m pytest -q tests/test_airflow_dag.py

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) $(LOCK_VENV) .pytest_cache build *.egg-info
