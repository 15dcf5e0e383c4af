# Two commands do everything on a fresh machine (set-up included, idempotent):
#   make demo   teacher -> baseline student -> CSGR student on synthetic shapes, table + pictures
#   make test   the test suite
PY := .venv/bin/python

.PHONY: setup demo test clean
setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf output/demo .pytest_cache
