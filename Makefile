# Tasks for kiro2api. `make test` bootstraps a virtualenv in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PREFIX ?= /opt/kiro2api
UNITDIR ?= /etc/systemd/system
MODULES := kiro2api.py eventstream.py convert.py

.PHONY: install test lint run bench dist clean

$(BIN)/.installed: setup.cfg Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/python -m compileall -q $(MODULES) tests bench
	-$(BIN)/python -m ruff check $(MODULES) tests bench 2>/dev/null || true

run: $(BIN)/.installed
	$(BIN)/python kiro2api.py server --host 127.0.0.1

bench: $(BIN)/.installed
	$(BIN)/python bench/run.py

dist: dist/kiro2api.pyz

dist/kiro2api.pyz: $(MODULES)
	rm -rf build/pyz && mkdir -p build/pyz dist
	cp $(MODULES) build/pyz/
	$(PYTHON) -m zipapp build/pyz -m 'kiro2api:cli' -p '/usr/bin/env python3' -o $@

install: dist/kiro2api.pyz
	install -d $(DESTDIR)$(PREFIX)
	install -m 0644 dist/kiro2api.pyz $(DESTDIR)$(PREFIX)/kiro2api.pyz
	install -D -m 0644 kiro2api.service $(DESTDIR)$(UNITDIR)/kiro2api.service

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis __pycache__ tests/__pycache__ bench/__pycache__
