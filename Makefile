# make install [DESTDIR=/stage] [PREFIX=/usr/local] [SYSCONFDIR=/etc] [UNITDIR=...]
#
# The package goes into a virtualenv of its own, $(PREFIX)/lib/meshvpn/venv,
# with $(PREFIX)/bin/meshvpn linking to its script: meshvpn's dependencies
# (pyroute2, cryptography, ...) never meet the system Python's packages, and
# Debian's Python refuses pip installs into the system (PEP 668) anyway.
# A venv is not relocatable by itself: made under DESTDIR, its scripts name
# DESTDIR in their first line, so that prefix is cut from them; moved to
# $(PREFIX), the tree works (tests/e2e/test_install.py checks exactly that).
# An existing config is never overwritten.

PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
LIBDIR ?= $(PREFIX)/lib/meshvpn
PYTHON ?= python3
DESTDIR ?=

VENV = $(DESTDIR)$(LIBDIR)/venv

.PHONY: install uninstall

install:
	$(PYTHON) -m venv --clear $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check .
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -rlI -- "$(DESTDIR)" $(VENV)/bin $(VENV)/pyvenv.cfg \
	    | xargs -r sed -i -e "s|$(DESTDIR)$(LIBDIR)|$(LIBDIR)|g"; \
	fi
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sfn $(LIBDIR)/venv/bin/meshvpn $(DESTDIR)$(PREFIX)/bin/meshvpn
	install -d $(DESTDIR)$(UNITDIR)
	install -m 0644 systemd/*.service $(DESTDIR)$(UNITDIR)/
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/meshvpn
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/meshvpn/meshvpn.toml ]; then \
	  echo "kept $(DESTDIR)$(SYSCONFDIR)/meshvpn/meshvpn.toml"; \
	else \
	  install -m 0644 etc/meshvpn.toml $(DESTDIR)$(SYSCONFDIR)/meshvpn/meshvpn.toml; \
	fi

uninstall:
	rm -rf $(DESTDIR)$(LIBDIR)
	rm -f $(DESTDIR)$(PREFIX)/bin/meshvpn
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(notdir $(wildcard systemd/*.service)))
	@echo "left $(DESTDIR)$(SYSCONFDIR)/meshvpn/ (your config) in place"

# ---- benchmarks (as root; ./run installs what they need)
.PHONY: bench bench-quick

# Every benchmark against its same-run baseline (~16 min on 2 cores):
# bench/results/latest.json and latest.md. ARGS=... passes options to bench/run.py.
bench:
	./run bench $(ARGS)

# Each benchmark once (a few minutes): what the test suite runs so the harness cannot rot.
bench-quick:
	./run bench --quick --out-dir bench/results/quick $(ARGS)
