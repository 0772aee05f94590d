# Two entry points: `make demo` (set up, then build the embedded demo) and `make test` (set up, then run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean chromium

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/pairforge demo

test: setup chromium
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Headless Chromium renders report.html in tests/test_report.py and benchmarks/report.py. Installed with apt-get
# (sudo -n when not root) where it is missing; where that fails the rendering tests skip, naming the reason.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo "sudo -n")
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the report rendering tests will skip"

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo-out .pytest_cache
