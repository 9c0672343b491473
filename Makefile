# emr-chain: `make demo` runs the paper's workflow end to end, `make test` runs every test.
# Everything either needs (a Python venv, Kubo, newman) is installed into ignored folders here.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
NEWMAN_VERSION := 6.2.2
NEWMAN := .tools/npm/node_modules/.bin/newman
PYTEST_ARGS ?=

.PHONY: help install venv kubo toxiproxy newman test test-fast demo lab up down bench kubo-start kubo-stop kubo-status clean

help:
	@echo "make demo     run the paper's workflow across three nodes (installs what is missing)"
	@echo "make test     run the whole test suite"
	@echo "make test-fast  the in-process tests only (no Kubo, no node processes): seconds, for the edit-run loop"
	@echo "make lab      the workflow across hosts: network namespaces, a node and a Kubo on each (needs root)"
	@echo "make up       start Kubo and the three role nodes for Postman or curl; Ctrl-C stops them"
	@echo "make down     stop nodes and Kubo daemons left running"
	@echo "make bench    measure, and write bench/results/"

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

test: venv kubo newman
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
