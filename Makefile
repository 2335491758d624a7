# make demo: set up on a fresh machine and replay real recordings through the gateway.
# make test: set up on a fresh machine and run the test-suite.
# Both install what they need: a virtualenv with the project, and mosquitto (Debian).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test check format system-packages clean

demo: $(STAMP) system-packages
	$(BIN)/iomt-gateway demo

test: $(STAMP) system-packages
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "iomt-gateway needs Python 3.11 or newer: make PYTHON=python3.11 ..."; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,learning,federation]'
	touch $@

# The demo and the tests start their own mosquitto on a free loopback port and stop it
# after; they only need the Debian package installed (not its system service). The
# tests also lint the unit files with systemd-analyze (Debian package systemd).
system-packages:
	@missing=""; \
	{ command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto; } || missing="mosquitto"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	test -z "$$missing" || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
