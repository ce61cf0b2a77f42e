# Two entry points (see README): `make serve` and `make test`. Both build the venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: serve install test test-deps lint

serve: install
	$(VENV)/bin/atelier3d serve $(ARGS)

install: $(VENV)/.installed

# The CPU server set with the test tools, at the versions in constraints/tested.txt (torch and
# torchvision as this machine kind keeps them on disk; hy3dgen rebuilt without its onnxruntime,
# rembg and opencv-python requirements, written to .cache/wheels). A GPU machine installs
# ".[server,gpu]" the same way (k8s/Dockerfile).
CONSTRAINTS := constraints/tested.txt
WHEELS := .cache/wheels
# The Segment tab's browser runtime (onnxruntime-web) comes from the npm registry at the version
# and integrity package-lock.json pins; the Gateway serves it, so pages load nothing from outside.
UI_STATIC := atelier3d/serve/ui/static
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) constraints/hy3dgen_wheel.py $(UI_STATIC)/package-lock.json
	npm ci --prefix $(UI_STATIC) --ignore-scripts --no-audit --no-fund
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) constraints/hy3dgen_wheel.py $(WHEELS)
	$(PIP) install -q -c $(CONSTRAINTS) --find-links $(WHEELS) -e ".[server,cpu,test]"
	$(PIP) check
	touch $@

# The browser tests drive Debian's chromium with Playwright (no browser download); the Redis
# session tests start Debian's redis-server on a free port of their own.
test-deps: install
	@command -v chromium >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	@command -v redis-server >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server)

lint: install
	$(VENV)/bin/ruff check atelier3d tests benchmarks constraints

test: test-deps lint
	ATELIER3D_RAY_LOGS=0 $(VENV)/bin/pytest -q -p no:cacheprovider
