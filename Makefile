# The two commands: `make run` starts the whole stack, `make test` runs every check.
# Both bootstrap .venv from python3 on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OPENCLAW_WRAPPER := $(CURDIR)/.tools/bin/openclaw

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
		$(BIN)/pytest

install-openclaw:
	bash scripts/install-openclaw.sh

bench: $(STAMP)
	$(BIN)/python -m bench.provision

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
