VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test serve check bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/freshcache serve

check: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

BENCHES := race cache_ops pipeline realtime warming service

bench: $(STAMP)
	set -e; for name in $(BENCHES); do $(PY) bench/$$name.py; done

bench-quick: $(STAMP)
	set -e; for name in $(BENCHES); do $(PY) bench/$$name.py --quick; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
