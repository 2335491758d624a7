# make demo: set up on a fresh machine and replay real recordings through the gateway.
# make test: set up on a fresh machine and run the test-suite.
# Both install what they need: a virtualenv with the project, and mosquitto (Debian).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test check format broker-package clean

demo: $(STAMP) broker-package
	$(BIN)/iomt-gateway demo

test: $(STAMP) broker-package
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
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,learning,federation]'
	touch $@

# The demo and the tests start their own mosquitto on a free loopback port and stop it
# after; they only need the Debian package installed (not its system service).
broker-package:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto >/dev/null; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
