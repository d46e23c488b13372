# pushchannel: two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev

.PHONY: venv run test lint proto proto-check bench clean system-deps peer-deps bench-peers bench-docs

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev,uvloop,redis,jwt,bench]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(VENV)/bin/pushchannel serve

# Debian's redis-server for the Redis store's tests, when missing and we are root.
system-deps:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	      || echo "warning: could not install redis-server"; \
	  else echo "note: redis-server is missing and we are not root: its tests will say so"; fi; \
	fi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

proto: venv
	$(PY) scripts/gen_proto.py

proto-check: venv
	$(PY) scripts/gen_proto.py --check

test: venv system-deps lint
	$(PY) -m pytest

bench: venv
	$(VENV)/bin/pushchannel bench

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .mypy_cache .pytest_cache .ruff_cache

# Peers (Redis, NATS) for `pushchannel bench peers`: Debian's servers, when missing and we are root.
peer-deps:
	@for bin in redis-server nats-server; do \
	  if ! command -v $$bin >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$bin >/dev/null) \
	        || echo "warning: could not install $$bin"; \
	    else echo "note: $$bin is missing: its peers will be skipped"; fi; \
	  fi; \
	done

bench-peers: venv peer-deps
	$(PIP) install -q -c constraints.txt -e '.[bench,bench-peers]'
	$(VENV)/bin/pushchannel bench peers

bench-docs: venv peer-deps
	$(PIP) install -q -c constraints.txt -e '.[bench,bench-peers]'
	$(VENV)/bin/pushchannel bench all --markdown docs/benchmarks.md --plot docs/benchmarks.png
