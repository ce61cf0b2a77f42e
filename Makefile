# Two entry points (see README): `make serve` and `make test`. Both build the venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: serve install test test-deps lint

serve: install
	$(VENV)/bin/atelier3d serve $(ARGS)

install: $(VENV)/.installed

# torch==2.14.1 / torchvision==0.29.1 are the builds this machine kind keeps on disk (fast).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test]"
	touch $@

# The browser tests drive Debian's chromium with Playwright (no browser download); the Redis
# session tests start Debian's redis-server on a free port of their own.
test-deps: install
	@command -v chromium >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	@command -v redis-server >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server)

lint: install
	$(VENV)/bin/ruff check atelier3d tests benchmarks

test: test-deps lint
	ATELIER3D_RAY_LOGS=0 $(VENV)/bin/pytest -q -p no:cacheprovider
