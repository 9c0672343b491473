# emr-chain: `make demo` runs the paper's workflow end to end, `make test` runs every test.
# Everything either needs (a Python venv, Kubo, newman) is installed into ignored folders here.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
NEWMAN_VERSION := 6.2.2
NEWMAN := .tools/npm/node_modules/.bin/newman
CHROMIUM := /usr/bin/chromium
PYTEST_ARGS ?=

.PHONY: help install venv kubo toxiproxy newman browser test test-fast demo lab up down bench kubo-start kubo-stop kubo-status clean

help:
	@echo "make demo     run the paper's workflow across three nodes (installs what is missing)"
	@echo "make test     run the whole test suite"
	@echo "make test-fast  the in-process tests only (no Kubo, no node processes): seconds, for the edit-run loop"
	@echo "make lab      the workflow across hosts: network namespaces, a node and a Kubo on each (needs root)"
	@echo "make up       start Kubo and the three role nodes for Postman or curl; Ctrl-C stops them"
	@echo "make down     stop nodes and Kubo daemons left running"
	@echo "make bench    measure, and write bench/results/"
	@echo "make browser  install Debian's chromium for the page's browser tests (make test does it)"

install: venv kubo

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

kubo:
	scripts/kubo.sh install

toxiproxy:
	scripts/toxiproxy.sh install

newman: $(NEWMAN)

$(NEWMAN):
	mkdir -p .tools/npm
	npm install --prefix .tools/npm --no-audit --no-fund --loglevel=error newman@$(NEWMAN_VERSION)

# The browser tests drive Debian's Chromium (a test tool's own browser download cannot work here). Installed with
# apt-get when missing; if that cannot be done, the tests skip saying why and the rest of `make test` still runs.
browser:
	@if [ -x $(CHROMIUM) ]; then \
		echo "browser: $$($(CHROMIUM) --version 2>/dev/null || echo $(CHROMIUM))"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
		echo "browser: apt-get could not install chromium; the browser tests will be skipped"; \
	else \
		echo "browser: no $(CHROMIUM), and apt-get needs root here; the browser tests will be skipped"; \
	fi

test: venv kubo newman browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: venv kubo
	scripts/demo.sh

lab: venv kubo
	$(PY) scripts/lab_demo.py $(LAB_ARGS)

up: venv kubo
	$(PY) scripts/cluster.py up --foreground

down:
	if [ -x $(PY) ]; then $(PY) scripts/cluster.py down; else scripts/kubo.sh stop --all; fi

bench: venv kubo
	$(PY) bench/run.py

kubo-start: kubo
	scripts/kubo.sh start

kubo-stop:
	scripts/kubo.sh stop --all

kubo-status:
	scripts/kubo.sh status

clean: down
	rm -rf .state data
