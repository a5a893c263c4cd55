# The two commands: `make run` starts the whole stack, `make test` runs every check.
# Both bootstrap .venv from python3 on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OPENCLAW_WRAPPER := $(CURDIR)/.tools/bin/openclaw
# Test processes (pytest-xdist). Each runs its own PostgreSQL and Temporal dev server; the suite
# mostly waits on them and on gateways: with 2, pytest took 738 s in a fresh-clone .ci/run, against 1228 s serial
# before (stop 15), on 2 cores. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2

.PHONY: run test lint install-openclaw bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Local agents run the real OpenClaw gateway: `slopbox dev` installs it into .tools/ on first use
# (scripts/install-openclaw.sh, as `make install-openclaw`); SLOPBOX_GATEWAY=simulator, or no package
# registry reachable (one line says so), runs the gateway simulator instead.
run: $(STAMP)
	$(BIN)/slopbox dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The real-gateway tier runs when .tools/bin/openclaw exists (make install-openclaw) or OPENCLAW_BIN is set.
test: lint
	OPENCLAW_BIN="$${OPENCLAW_BIN:-$$( [ -x $(OPENCLAW_WRAPPER) ] && echo $(OPENCLAW_WRAPPER) )}" \
		$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

install-openclaw:
	bash scripts/install-openclaw.sh

bench: $(STAMP)
	$(BIN)/python -m bench.provision

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
