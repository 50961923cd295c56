# smtpgate — developer entry points.
#
#   make run    [CONFIG=gate.yaml]        run the gate in the foreground (.venv/bin/smtpgate serve)
#   make test   [PYTEST_ARGS='-k relay']   every test tier (installs what they need); one tier:
#               PYTEST_ARGS=tests/unit    (or tests/rules, tests/protocol, tests/process, tests/postfix)
#   make bench  [SYSTEMS=... RUNS=...]     the side-by-side benchmark (bench/run.sh, bench/README.md)
#   make clean / make distclean            build leftovers / also the virtualenv
#
# The virtualenv is (re)installed only when pyproject.toml changed since the last install
# (stamp files inside .venv); the install is editable, so source edits need no reinstall.

SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
CONFIG      ?=
PYTEST_ARGS ?=
# sudo only when not root (and only for the Debian packages).
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench tools clean distclean

# Debian's python3 needs python3-venv for `-m venv` (ensurepip); install it when missing.
$(VPY):
	$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	  $(PYTHON) -m venv $(VENV); }

$(VENV)/.installed-run: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(VENV)/bin/smtpgate serve $(if $(CONFIG),-c $(CONFIG))

# Postfix's smtp-sink/smtp-source and swaks, from Debian, only when missing. The postfix
# daemon must not start: a temporary policy-rc.d (exit 101) blocks invoke-rc.d, and
# debconf's "No configuration" leaves the MTA unconfigured.
tools:
	@missing=""; \
	for t in smtp-sink smtp-source swaks sqlite3 openssl systemd-analyze; do \
	  command -v "$$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$$t" ] || missing="$$missing $$t"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "installing Debian packages postfix (daemon not started), swaks, sqlite3, openssl, systemd; missing:$$missing"; \
	created=0; \
	if [ ! -e /usr/sbin/policy-rc.d ]; then \
	  printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	  $(SUDO) chmod 755 /usr/sbin/policy-rc.d; \
	  created=1; \
	fi; \
	trap 'if [ "$$created" = 1 ]; then $(SUDO) rm -f /usr/sbin/policy-rc.d; fi' EXIT; \
	echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix swaks sqlite3 openssl systemd

test: $(VENV)/.installed-test tools
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# Knobs by environment (bench/README.md): RUNS N_PAR N_SEQ LAT_N WORKLOADS SYSTEMS ...
bench: $(VENV)/.installed-run tools
	bash bench/run.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache var $(VENV)/.installed-run $(VENV)/.installed-test
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
