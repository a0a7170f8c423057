# One definition of each check; CI calls `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PREFIX ?= /opt/cl
UNITDIR ?= /etc/systemd/system

.PHONY: dev demo test lint format bench run install clean

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

format: dev
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: dev
	$(BIN)/python bench/run.py
	$(BIN)/python bench/balancer.py
	$(BIN)/python bench/rescue.py
	$(BIN)/python bench/soak.py
	$(BIN)/python bench/crash_stress.py --trials 100

# Both daemons in the foreground on ./var, or VAR=dir (no systemd); Ctrl-C stops both. As root, the CLI
# gets its own user (cl-cli, made by systemd-sysusers as the units' install does); as anyone else, the
# daemons say at start what cannot hold.
VAR ?= var
run: dev
	@mkdir -p $(VAR)/claude $(VAR)/state $(VAR)/run
	@chmod 0700 $(VAR)/claude $(VAR)/state
	@if [ "$$(id -u)" = 0 ]; then systemd-sysusers $(CURDIR)/packaging/systemd/sysusers.d/cl.conf; fi
	@test -f $(VAR)/config.toml || printf 'credentials_dir = "claude"\nstate_dir = "state"\nsessions_dir = "sessions"\nruntime_dir = "run"\n' > $(VAR)/config.toml
	@echo "credentials: $(VAR)/claude   try: CL_CONFIG=$(VAR)/config.toml $(BIN)/cl accounts"
	@CL_CONFIG=$(VAR)/config.toml $(BIN)/python -m cl.devrun

# As root on the target machine: a venv in $(PREFIX), the units, the cl user, /opt/claude.
# ROOT=/some/dir installs into that tree instead (how the tests check this target).
install:
	$(PYTHON) -m venv $(ROOT)$(PREFIX)
	$(ROOT)$(PREFIX)/bin/pip install --quiet --upgrade pip
	rm -rf build  # setuptools' build dir can hold modules the source no longer has
	$(ROOT)$(PREFIX)/bin/pip install --quiet .
	install -D -m 0644 -t $(ROOT)$(UNITDIR) packaging/systemd/*.service packaging/systemd/*.socket
	install -D -m 0644 packaging/systemd/sysusers.d/cl.conf $(ROOT)/usr/lib/sysusers.d/cl.conf
	install -D -m 0644 packaging/systemd/tmpfiles.d/cl.conf $(ROOT)/usr/lib/tmpfiles.d/cl.conf
	systemd-sysusers $(if $(ROOT),--root=$(ROOT)) $(ROOT)/usr/lib/sysusers.d/cl.conf
	systemd-tmpfiles $(if $(ROOT),--root=$(ROOT)) --create $(ROOT)/usr/lib/tmpfiles.d/cl.conf
	@if [ -z "$(ROOT)" ]; then systemctl daemon-reload || echo "systemctl daemon-reload failed: is systemd running?"; fi

clean:
	rm -rf $(VENV) var build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
