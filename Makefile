# The two quick-start commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test test-fast lint docs bench bench-baseline bench-curves bench-profile clean

$(BIN)/idemproxy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The example service on :8080 and idemproxy on :8000 in front of it (memory store).
run: $(BIN)/idemproxy
	@$(BIN)/python deploy/example/recognitions.py --port 8080 & app=$$!; \
	trap "kill $$app 2>/dev/null" EXIT INT TERM; \
	$(BIN)/idemproxy run --config config/proxy.yaml

# What CI runs: lint, types, the layer contract, the docs site, then the whole suite.
test: lint docs
	$(BIN)/pytest -q

# The quick lane: no redis-server, no subprocesses, nothing marked slow (about a minute).
test-fast: lint
	$(BIN)/pytest -q -m "not slow and not process and not redis"

lint: $(BIN)/idemproxy
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# --strict: a broken link, a missing page or a page left out of the nav fails the build.
docs: $(BIN)/idemproxy
	$(BIN)/mkdocs build --strict --quiet --site-dir .site

bench: $(BIN)/idemproxy
	$(BIN)/python -m bench

# `make bench` with the code issue 18's targets were set against (2026-11-28) measured in the same
# rounds: a git worktree of BASELINE_REV with its own venv, then a "baseline (same run)" column.
BASELINE_REV ?= 44e2461
BASELINE_DIR ?= .bench-baseline
bench-baseline: $(BIN)/idemproxy
	test -d $(BASELINE_DIR) || git worktree add --detach $(BASELINE_DIR) $(BASELINE_REV)
	test -x $(BASELINE_DIR)/.venv/bin/python || \
	  ($(PYTHON) -m venv $(BASELINE_DIR)/.venv && \
	   $(BASELINE_DIR)/.venv/bin/pip install --quiet -e $(BASELINE_DIR))
	$(BIN)/python -m bench --baseline $(BASELINE_DIR)

# Where a pass-through request's CPU goes, stage by stage (py-spy; the README's budget table).
bench-profile: $(BIN)/idemproxy
	$(BIN)/python -m bench.stage_profile

# Cost against the amount of work: idle connections, memory-store records (0, 100k, 1M: about
# 20 minutes to fill), routes (docs/performance.md).
bench-curves: $(BIN)/idemproxy
	$(BIN)/python -m bench --curves idle,records,routes

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
