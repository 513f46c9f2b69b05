# Tasks for kiro2api. `make test` bootstraps a virtualenv in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODULES := kiro2api.py eventstream.py convert.py
# `make dist` writes $(DIST)/kiro2api.pyz, staging the files in $(BUILD)/pyz.
DIST ?= dist
BUILD ?= build
PYZ := $(DIST)/kiro2api.pyz
# `make install` copies the pyz to $(PREFIX) and the unit to $(UNITDIR), both
# under $(DESTDIR) for packaging (`make install DESTDIR=/tmp/root`).
PREFIX ?= /opt/kiro2api
UNITDIR ?= /etc/systemd/system

.PHONY: install test test-fast lint run demo bench e2e e2e-codex e2e-codex-failures \
	e2e-claude-code e2e-qwen-code dist clean

$(BIN)/.installed: setup.cfg Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

# The fast tier for development: no processes, nothing over a second.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/python -m compileall -q $(MODULES) tests bench
	-$(BIN)/python -m ruff check $(MODULES) tests bench 2>/dev/null || true

run: $(BIN)/.installed
	$(BIN)/python kiro2api.py server --host 127.0.0.1

# No Kiro account needed: kiro2api in front of the tests' fake Kiro backend.
demo: $(BIN)/.installed
	$(BIN)/python tests/demo.py

bench: $(BIN)/.installed
	$(BIN)/python bench/run.py

# Opt-in: real agent CLIs from npm (cached in $(E2E_CACHE), or ~/.cache/kiro2api-e2e)
# run a shell-tool loop through a kiro2api process in front of the fake Kiro;
# e2e-codex-failures counts the requests Codex makes for each way Kiro fails (under
# a minute). `make e2e CODEX_VERSION=latest` tries the newest Codex; `make -k e2e`
# runs them all even when one fails.
CODEX_VERSION ?= 0.171.0
CLAUDE_CODE_VERSION ?= 2.1.332
QWEN_CODE_VERSION ?= 0.24.4
e2e: e2e-codex e2e-codex-failures e2e-claude-code e2e-qwen-code

e2e-codex: $(BIN)/.installed
	CODEX_VERSION=$(CODEX_VERSION) $(BIN)/python tests/e2e/run_codex.py

e2e-codex-failures: $(BIN)/.installed
	CODEX_VERSION=$(CODEX_VERSION) $(BIN)/python tests/e2e/run_codex_failures.py

e2e-claude-code: $(BIN)/.installed
	CLAUDE_CODE_VERSION=$(CLAUDE_CODE_VERSION) $(BIN)/python tests/e2e/run_claude_code.py

e2e-qwen-code: $(BIN)/.installed
	QWEN_CODE_VERSION=$(QWEN_CODE_VERSION) $(BIN)/python tests/e2e/run_qwen_code.py

dist: $(PYZ)

# Reproducible: the modules and a __main__.py, in this order, with fixed
# times and modes (zipapp's own -m stamps __main__.py with the current time,
# and it adds a directory's files in the file system's order), zipped by the
# stdlib, then made into a zipapp with its #! line.
$(PYZ): $(MODULES) Makefile
	rm -rf $(BUILD)/pyz && mkdir -p $(BUILD)/pyz $(DIST)
	cp $(MODULES) $(BUILD)/pyz/
	printf '# -*- coding: utf-8 -*-\nimport kiro2api\nkiro2api.cli()\n' > $(BUILD)/pyz/__main__.py
	chmod 0644 $(BUILD)/pyz/*.py
	touch -t 198001020000 $(BUILD)/pyz/*.py
	$(PYTHON) -m zipfile -c $(BUILD)/pyz.zip $(addprefix $(BUILD)/pyz/,__main__.py $(MODULES))
	$(PYTHON) -m zipapp $(BUILD)/pyz.zip -p '/usr/bin/env python3' -o $@

install: $(PYZ)
	install -d $(DESTDIR)$(PREFIX) $(DESTDIR)$(UNITDIR)
	install -m 0755 $(PYZ) $(DESTDIR)$(PREFIX)/kiro2api.pyz
	install -m 0644 kiro2api.service $(DESTDIR)$(UNITDIR)/kiro2api.service

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis __pycache__ tests/__pycache__ bench/__pycache__
