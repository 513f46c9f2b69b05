# Tasks for kiro2api: `make` alone lists them. `make test` bootstraps a
# virtualenv in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODULES := kiro2api.py eventstream.py convert.py
# `make dist` writes $(DIST)/kiro2api.pyz, staging the files in $(BUILD)/pyz.
DIST ?= dist
BUILD ?= build
PYZ := $(DIST)/kiro2api.pyz
# `make install` copies the pyz to $(PREFIX) and the unit to $(UNITDIR), both
# under $(DESTDIR) for packaging (`make install DESTDIR=/tmp/root`). The unit
# installed runs $(PREFIX)/kiro2api.pyz: DESTDIR is where the files are put,
# PREFIX where they will be when the system runs them.
PREFIX ?= /opt/kiro2api
UNITDIR ?= /etc/systemd/system

.PHONY: help install test test-fast lint run demo fake bench e2e e2e-codex e2e-codex-failures e2e-claude-code e2e-qwen-code dist clean
.DEFAULT_GOAL := help

# Every target with a `## what it does` comment, in the order of this file.
help: ## list the targets
	@echo 'make TARGET, where TARGET is one of:'
	@awk -F ':.*## ' '/^[a-z][a-z0-9-]*:.*## / { printf "  %-19s %s\n", $$1, $$2 }' Makefile

$(BIN)/.installed: setup.cfg Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: $(BIN)/.installed ## run every test (creates .venv with the test extras first)
	$(BIN)/python -m pytest -q

# The fast tier for development: no processes, nothing over a second.
test-fast: $(BIN)/.installed ## the tests that start no process and take under a second
	$(BIN)/python -m pytest -q -m "not slow"

# ruff is pinned in the test extras; tests/test_ops.py runs it too, so CI does.
lint: $(BIN)/.installed ## ruff (the version in setup.cfg) and a byte-compile
	$(BIN)/python -m compileall -q $(MODULES) tests bench
	$(BIN)/python -m ruff check .

run: $(BIN)/.installed ## kiro2api server on 127.0.0.1:8080 with your Kiro login
	$(BIN)/python kiro2api.py server --host 127.0.0.1

# No Kiro account needed: kiro2api in front of the tests' fake Kiro backend.
demo: $(BIN)/.installed ## one streamed answer from the fake Kiro backend, then stop
	$(BIN)/python tests/demo.py

# The same, left running for clients of your own (tests/demo.py --serve [--port N]).
fake: $(BIN)/.installed ## kiro2api in front of the fake backend until Ctrl-C; prints URL and key
	$(BIN)/python tests/demo.py --serve

bench: $(BIN)/.installed ## the benchmarks (about 20 minutes)
	$(BIN)/python bench/run.py

# Opt-in: real agent CLIs from npm (cached in $(E2E_CACHE), or ~/.cache/kiro2api-e2e)
# run a shell-tool loop through a kiro2api process in front of the fake Kiro;
# e2e-codex-failures counts the requests Codex makes for each way Kiro fails (under
# a minute). `make e2e CODEX_VERSION=latest` tries the newest Codex; `make -k e2e`
# runs them all even when one fails.
CODEX_VERSION ?= 0.171.0
CLAUDE_CODE_VERSION ?= 2.1.337
QWEN_CODE_VERSION ?= 0.24.4
e2e: e2e-codex e2e-codex-failures e2e-claude-code e2e-qwen-code ## real Codex, Claude Code and Qwen Code from npm, against the fake

e2e-codex: $(BIN)/.installed ## Codex alone (CODEX_VERSION=latest for the newest)
	CODEX_VERSION=$(CODEX_VERSION) $(BIN)/python tests/e2e/run_codex.py

e2e-codex-failures: $(BIN)/.installed ## what each way Kiro fails costs in Codex requests
	CODEX_VERSION=$(CODEX_VERSION) $(BIN)/python tests/e2e/run_codex_failures.py

e2e-claude-code: $(BIN)/.installed ## Claude Code alone (CLAUDE_CODE_VERSION=...)
	CLAUDE_CODE_VERSION=$(CLAUDE_CODE_VERSION) $(BIN)/python tests/e2e/run_claude_code.py

e2e-qwen-code: $(BIN)/.installed ## Qwen Code alone (QWEN_CODE_VERSION=...)
	QWEN_CODE_VERSION=$(QWEN_CODE_VERSION) $(BIN)/python tests/e2e/run_qwen_code.py

dist: $(PYZ) ## build dist/kiro2api.pyz, the one-file server (DIST= puts it elsewhere)

# Reproducible: the modules and a __main__.py, in this order, with fixed
# times and modes (zipapp's own -m stamps __main__.py with the current time,
# and it adds a directory's files in the file system's order), zipped by the
# stdlib, then made into a zipapp with its #! line.
$(PYZ): $(MODULES) Makefile
	rm -rf $(BUILD)/pyz && mkdir -p $(BUILD)/pyz $(DIST)
	cp $(MODULES) $(BUILD)/pyz/
	printf '%s\n' '# -*- coding: utf-8 -*-' 'import sys' 'try:' '    import kiro2api' \
		'except ImportError as exc:  # aiohttp or click missing or too old: say what to install' \
		"    if exc.name not in ('aiohttp', 'click'):" '        raise' '    sys.exit(str(exc))' \
		'kiro2api.cli()' > $(BUILD)/pyz/__main__.py
	chmod 0644 $(BUILD)/pyz/*.py
	touch -t 198001020000 $(BUILD)/pyz/*.py
	$(PYTHON) -m zipfile -c $(BUILD)/pyz.zip $(addprefix $(BUILD)/pyz/,__main__.py $(MODULES))
	$(PYTHON) -m zipapp $(BUILD)/pyz.zip -p '/usr/bin/env python3' -o $@

install: $(PYZ) ## copy the pyz to PREFIX and the unit to UNITDIR, under DESTDIR
	mkdir -p $(BUILD)
	sed 's|^ExecStart=/usr/bin/python3 /opt/kiro2api/kiro2api.pyz |ExecStart=/usr/bin/python3 $(PREFIX)/kiro2api.pyz |' \
		kiro2api.service > $(BUILD)/kiro2api.service
	grep -qxF 'ExecStart=/usr/bin/python3 $(PREFIX)/kiro2api.pyz server' $(BUILD)/kiro2api.service \
		|| { echo 'kiro2api.service: no ExecStart= line to point at $(PREFIX)' >&2; exit 1; }
	install -d $(DESTDIR)$(PREFIX) $(DESTDIR)$(UNITDIR)
	install -m 0755 $(PYZ) $(DESTDIR)$(PREFIX)/kiro2api.pyz
	install -m 0644 $(BUILD)/kiro2api.service $(DESTDIR)$(UNITDIR)/kiro2api.service

clean: ## remove what the build and the tests leave behind
	rm -rf build dist *.egg-info .pytest_cache .hypothesis __pycache__ tests/__pycache__ bench/__pycache__
