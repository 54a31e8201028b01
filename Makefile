# The two quick-start commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench clean

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

test: $(BIN)/idemproxy
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -q

bench: $(BIN)/idemproxy
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
