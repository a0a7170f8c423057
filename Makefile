# One definition of each check; CI calls `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PREFIX ?= /opt/cl
UNITDIR ?= /etc/systemd/system

.PHONY: dev demo test lint format bench run install uninstall generate clean

dev: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The seed's afternoon on ./var/demo with the fake CLI: three accounts wall, a fourth is dropped in.
demo: dev
	$(BIN)/python -m cl.demo --claude tests/fakes/claude --root var/demo

test: lint
	$(BIN)/pytest

lint: dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/python tests/lint/imports.py
	$(BIN)/python tests/lint/links.py

format: dev
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: dev
	$(BIN)/python bench/run.py
	$(BIN)/python bench/balancer.py
	$(BIN)/python bench/rescue.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/soak.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/week.py
	$(BIN)/python bench/dashboard.py
	$(BIN)/python bench/crash_stress.py --trials 100
	$(BIN)/python bench/crash_stress.py --trials 60 --store postgresql

# The daemons in the foreground on ./var, or VAR=dir (no systemd); Ctrl-C stops them. As root, each job's
# CLI gets a user of its own (cl-cli-N, made by systemd-sysusers as the units' install does) and a view
# of its own (bubblewrap); as anyone else that cannot be, and a new config.toml says confinement = "none".
VAR ?= var
# $(call prepend,LINE,FILE): LINE first in FILE (a key after a [table] would belong to that table).
prepend = { echo '$(1)'; cat $(2); } > $(2).new && mv $(2).new $(2)
run: dev
	@mkdir -p $(VAR)/claude $(VAR)/state $(VAR)/run
	@chmod 0700 $(VAR)/claude $(VAR)/state
	@if [ "$$(id -u)" = 0 ]; then \
		echo "as root: making the system users and groups of packaging/systemd/sysusers.d/cl.conf that are missing (cl, cl-cli-1..16, cl-admin); each one made is named below"; \
		systemd-sysusers $(CURDIR)/packaging/systemd/sysusers.d/cl.conf 2>&1; fi
	@test -f $(VAR)/config.toml || printf 'credentials_dir = "claude"\nstate_dir = "state"\nsessions_dir = "sessions"\nruntime_dir = "run"\n' > $(VAR)/config.toml
	@if [ "$$(id -u)" != 0 ] && ! grep -q '^confinement' $(VAR)/config.toml; then \
		$(call prepend,confinement = "none"  # not root: no user of its own per job and no sandbox (make run as root has both),$(VAR)/config.toml); \
		echo "not root: the CLI runs unconfined (confinement = \"none\" in $(VAR)/config.toml)"; fi
	@grep -q '^cli_network' $(VAR)/config.toml || { \
		$(call prepend,cli_network = "host"  # no cl-cli@ unit narrows it here ("gateway": a network of its own),$(VAR)/config.toml); }
	@echo "credentials: $(VAR)/claude   try: CL_CONFIG=$(VAR)/config.toml $(BIN)/cl accounts"
	@CL_CONFIG=$(VAR)/config.toml $(BIN)/python -m cl.devrun

# As root on the target machine: a venv in $(PREFIX) with `cl` on PATH, its man page and completions,
# the units, the journal catalog, the users cl and cl-cli, /opt/claude, and a commented
# /etc/cl/config.toml (an existing one is never overwritten). ROOT=/some/dir installs into that
# tree instead (how the tests check these targets). EXTRAS=postgresql adds psycopg, for a store on PostgreSQL.
LOCAL := $(ROOT)/usr/local
CONFIG := $(ROOT)/etc/cl/config.toml
UNITS := cl-balancer.service cl-rescue.service cl-gateway.service cl-worker.socket cl-worker@.service cl-cli.socket cl-cli@.service cl-metrics.socket cl-metrics.service
install:
	$(PYTHON) -m venv $(ROOT)$(PREFIX)
	$(ROOT)$(PREFIX)/bin/pip install --quiet --upgrade pip
	rm -rf build  # setuptools' build dir can hold modules the source no longer has
	$(ROOT)$(PREFIX)/bin/pip install --quiet '.$(if $(EXTRAS),[$(EXTRAS)])'
	install -d $(LOCAL)/bin
	ln -sfn $(PREFIX)/bin/cl $(LOCAL)/bin/cl
	install -D -m 0644 packaging/man/cl.1 $(LOCAL)/share/man/man1/cl.1
	install -D -m 0644 packaging/completion/cl $(LOCAL)/share/bash-completion/completions/cl
	install -D -m 0644 packaging/completion/_cl $(LOCAL)/share/zsh/site-functions/_cl
	test -e $(CONFIG) || install -D -m 0644 packaging/config.toml $(CONFIG)
	install -D -m 0644 -t $(ROOT)$(UNITDIR) $(addprefix packaging/systemd/,$(UNITS))
	install -D -m 0644 packaging/systemd/sysusers.d/cl.conf $(ROOT)/usr/lib/sysusers.d/cl.conf
	install -D -m 0644 packaging/systemd/tmpfiles.d/cl.conf $(ROOT)/usr/lib/tmpfiles.d/cl.conf
	install -D -m 0644 packaging/systemd/catalog/cl.catalog $(ROOT)/usr/lib/systemd/catalog/cl.catalog
	systemd-sysusers $(if $(ROOT),--root=$(ROOT)) $(ROOT)/usr/lib/sysusers.d/cl.conf
	systemd-tmpfiles $(if $(ROOT),--root=$(ROOT)) --create $(ROOT)/usr/lib/tmpfiles.d/cl.conf
	journalctl $(if $(ROOT),--root=$(ROOT)) --update-catalog || echo "journalctl --update-catalog failed: the catalog is installed, not indexed"
	@if [ -z "$(ROOT)" ]; then systemctl daemon-reload || echo "systemctl daemon-reload failed: is systemd running?"; fi

# Everything `make install` put there, but the state (/var/lib/cl, /var/lib/cl-sessions), the
# credentials (/opt/claude) and a config.toml you edited; PURGE=1 removes those too. The users
# stay, as system users do (their files may outlive us; a uid is never reused by accident).
uninstall:
	@if [ -z "$(ROOT)" ]; then systemctl disable --now $(UNITS) 2>/dev/null || true; fi
	rm -rf $(ROOT)$(PREFIX)
	rm -f $(LOCAL)/bin/cl $(LOCAL)/share/man/man1/cl.1 $(LOCAL)/share/bash-completion/completions/cl \
		$(LOCAL)/share/zsh/site-functions/_cl $(addprefix $(ROOT)$(UNITDIR)/,$(UNITS)) \
		$(ROOT)/usr/lib/sysusers.d/cl.conf $(ROOT)/usr/lib/tmpfiles.d/cl.conf $(ROOT)/usr/lib/systemd/catalog/cl.catalog
	-journalctl $(if $(ROOT),--root=$(ROOT)) --update-catalog 2>/dev/null
	if cmp -s packaging/config.toml $(CONFIG) || [ "$(PURGE)" = 1 ]; then rm -f $(CONFIG); rmdir $(ROOT)/etc/cl 2>/dev/null || true; fi
	if [ "$(PURGE)" = 1 ]; then rm -rf $(ROOT)/var/lib/cl $(ROOT)/var/lib/cl-sessions $(ROOT)/opt/claude; fi
	@if [ -z "$(ROOT)" ]; then systemctl daemon-reload 2>/dev/null || true; fi

# The man page and the shell completions, generated from `cl`'s parser and committed (the wheel and
# `make install` carry them; tests/test_generated.py fails when they fall behind the parser).
GENERATED ?= packaging
MAN_DATE ?= 2026-12-01
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
generate: dev
	@mkdir -p $(GENERATED)/man $(GENERATED)/completion
	$(BIN)/shtab --shell=bash --error-unimportable --preamble "$$($(BIN)/python -c 'from cl.cli import COMPLETION; print(COMPLETION["bash"])')" cl.cli.parser > $(GENERATED)/completion/cl
	$(BIN)/shtab --shell=zsh --error-unimportable --preamble "$$($(BIN)/python -c 'from cl.cli import COMPLETION; print(COMPLETION["zsh"])')" cl.cli.parser > $(GENERATED)/completion/_cl
	SOURCE_DATE_EPOCH=$$(date -u -d $(MAN_DATE) +%s) $(BIN)/argparse-manpage --module cl.cli --function parser \
		--project-name cl-roster --version $(VERSION) --manual-title "cl manual" \
		--description "submit Claude Code work and see accounts, sessions and walls" \
		--include packaging/man/cl.include --output $(GENERATED)/man/cl.1

clean:
	rm -rf $(VENV) var build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
