# opsmesh — developer entry points. `make up` runs the stack, `make test` checks everything.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
NODE   := node_modules/.installed
TOOLS  := node_modules/.bin/protoc-gen-es
PROTOS := $(shell find proto -name '*.proto' | sort)
PY_PACKAGES := mesh identity_svc session_svc devtools
UI_BUILD := ui/dist/index.html
UI_SOURCES := $(shell find ui/src ui/public gen/ts -type f 2>/dev/null) \
  ui/index.html ui/vite.config.ts ui/tsconfig.json

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-11s %s\n", $$1, $$2}'

# --- environment -----------------------------------------------------------------------
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "opsmesh needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "cannot create a venv: on Debian, apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

# One npm workspace (package.json): the web client in ui/ and the code generators in tools/.
$(NODE): package.json package-lock.json tools/package.json ui/package.json
	@command -v npm >/dev/null || { echo "npm is missing: on Debian, apt-get install npm"; exit 1; }
	npm ci --no-audit --no-fund --silent
	@touch $@
$(TOOLS): $(NODE)

$(UI_BUILD): $(NODE) $(UI_SOURCES)
	npm --workspace ui run build --silent

.PHONY: install
install: $(STAMP) ## create .venv with every Python dependency

# The Debian packages (Redis, NATS, Prometheus, Chromium, Go...): installed as root or with sudo
# where missing; the list is devtools/system-packages (.ci/run uses it too).
.PHONY: system-packages system-packages-up
system-packages:
	@devtools/system-packages test
system-packages-up:
	@devtools/system-packages up

# --- contracts ---------------------------------------------------------------------------
.PHONY: gen
gen: $(STAMP) $(TOOLS) gen-go-tools ## regenerate gen/python, gen/ts and gen/go from proto/
	rm -rf gen/python/opsmesh
	mkdir -p gen/python
	$(PY) -m grpc_tools.protoc -I proto \
	  --python_out=gen/python --pyi_out=gen/python --grpc_python_out=gen/python \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=quiet:gen/python \
	  $(PROTOS)
	find gen/python/opsmesh -type d -exec touch {}/__init__.py \;
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/buf generate
	@# google.rpc error details (RetryInfo, ErrorInfo, BadRequest) for the web client, from the
	@# .proto that googleapis-common-protos ships (the Python side uses its _pb2 modules).
	rm -rf .gen-googleapis && mkdir -p .gen-googleapis/google/rpc
	cp "$$($(PY) -c 'import google.rpc as r; print(list(r.__path__)[0])')/error_details.proto" .gen-googleapis/google/rpc/
	$(BIN)/buf generate .gen-googleapis --template buf.gen.googleapis.yaml
	rm -rf .gen-googleapis
	@# gen/go (module opsmesh.dev/gen/go, its own go.mod): paths follow each file's go_package.
	rm -rf gen/go/opsmesh
	protoc -I proto --go_out=gen/go --go_opt=module=opsmesh.dev/gen/go \
	  --go-grpc_out=gen/go --go-grpc_opt=module=opsmesh.dev/gen/go $(PROTOS)

# The Go generators come from Debian (bookworm) and are pinned by its package versions: the
# generated headers name them, so gen-check needs exactly these.
GO_GEN_VERSIONS := libprotoc 3.21.12 / protoc-gen-go v1.28.1 / protoc-gen-go-grpc 1.0
GO_GEN_APT := protobuf-compiler libprotobuf-dev protoc-gen-go protoc-gen-go-grpc

.PHONY: gen-go-tools
gen-go-tools:
	@for tool in protoc protoc-gen-go protoc-gen-go-grpc; do command -v $$tool >/dev/null || { \
	  echo "$$tool is missing (gen/go): on Debian, apt-get install $(GO_GEN_APT)" >&2; exit 1; }; done
	@test -f /usr/include/google/protobuf/struct.proto || { \
	  echo "google/protobuf/*.proto are missing (gen/go): apt-get install libprotobuf-dev" >&2; exit 1; }
	@found="$$(protoc --version) / $$(protoc-gen-go --version) / $$(protoc-gen-go-grpc --version)"; \
	  echo "gen/go with $$found"; \
	  [ "$$found" = "$(GO_GEN_VERSIONS)" ] || { echo "gen/go needs $(GO_GEN_VERSIONS), found $$found:" \
	  "apt-get install $(GO_GEN_APT) from Debian bookworm" >&2; exit 1; }

.PHONY: gen-check
gen-check: ## fail when gen/ differs from what proto/ generates
	@rm -rf .gen-check && mkdir .gen-check && cp -r gen .gen-check/before
	@$(MAKE) --no-print-directory -s gen >/dev/null
	@# Bytecode caches are the interpreter's, not generated code (tests leave them in gen/python).
	@if ! diff -r -x __pycache__ .gen-check/before gen >/dev/null; then \
	  diff -r -x __pycache__ .gen-check/before gen | head -20; rm -rf .gen-check; \
	  echo "gen/ is out of date with proto/: run 'make gen' and commit the result"; exit 1; fi
	@rm -rf .gen-check; echo "gen-check: generated code is up to date"

# The contracts of the last release, which `make lint` checks proto/ against with `buf breaking`
# (contracts/baseline/README.md). Rebuild it only when cutting a release, and commit it.
BASELINE := contracts/baseline/opsmesh-contracts.binpb

.PHONY: contracts-baseline
contracts-baseline: $(STAMP) ## on a release: make proto/ the baseline `buf breaking` checks against
	$(BIN)/buf build --exclude-source-info -o $(BASELINE)

# --- checks ------------------------------------------------------------------------------
.PHONY: lint
lint: $(STAMP) ## ruff, mypy --strict, buf lint/format/breaking, envoy --mode validate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/envoy --mode validate -c envoy/envoy.yaml --use-dynamic-base-id --log-level warn
	$(BIN)/buf breaking --against $(BASELINE) && echo "buf breaking: compatible with $(BASELINE)"

.PHONY: ui-check
ui-check: $(NODE) ## the web client: tsc --strict and the Vitest unit tests
	npm --workspace ui run typecheck --silent
	npm --workspace ui run test --silent

# Follows a moved edge or Vite port (OPSMESH_DEV_EDGE_PORT, OPSMESH_DEV_UI_PORT) as `make up` does.
OPSMESH_DEV_EDGE_PORT ?= 8080
OPSMESH_DEV_UI_PORT ?= 5173
EDGE_URL = http://localhost:$(OPSMESH_DEV_EDGE_PORT)

.PHONY: ui-dev
ui-dev: $(NODE) ## the web client on http://localhost:5173 (OPSMESH_DEV_UI_PORT) with hot reload, against `make up`'s edge
	VITE_OPSMESH_API_URL=$(EDGE_URL) VITE_OPSMESH_ISSUER=$(EDGE_URL) \
	  OPSMESH_DEV_UI_PORT=$(OPSMESH_DEV_UI_PORT) npm --workspace ui run dev

.PHONY: test
test: system-packages $(STAMP) lint gen-check ui-check $(UI_BUILD) ## lint, gen-check, UI checks and every test (browser too) with coverage (>= 90%)
	$(BIN)/coverage erase
	$(BIN)/pytest --cov --cov-report=term $(PYTEST_ARGS)

.PHONY: eval
eval: $(STAMP) ## the agents' evaluation against a real model: make eval MODEL=llama3.2:3b [OLLAMA_HOST=...]
	@test -n "$(MODEL)" || { echo "usage: make eval MODEL=<model> (Ollama at OLLAMA_HOST, default http://127.0.0.1:11434)"; exit 2; }
	OPSMESH_EVAL_MODEL="$(MODEL)" OPSMESH_EVAL_OLLAMA_HOST="$${OLLAMA_HOST:-http://127.0.0.1:11434}" \
	  $(BIN)/pytest tests/evals -k model_evaluation -s -p no:cacheprovider

# The benches start the dev stack's servers (devtools), which is not in the wheel.
BENCH := PYTHONPATH=$(CURDIR) $(PY)

.PHONY: bench
bench: $(STAMP) $(UI_BUILD) ## run the benchmarks (bench/*.py; installs the Celery baseline)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(BENCH) bench/session_bench.py || true
	$(BENCH) bench/task_bench.py || true
	$(BENCH) bench/reaper_bench.py || true
	$(BENCH) bench/notify_bench.py || true
	$(BENCH) bench/chat_bench.py || true
	$(BENCH) bench/chat_profile.py || true
	$(BENCH) bench/agent_bench.py || true
	$(BENCH) bench/ui_stream_bench.py || true
	$(BENCH) bench/edge_bench.py

# --- dev stack ---------------------------------------------------------------------------
.PHONY: up
up: system-packages-up $(STAMP) $(UI_BUILD) ## start (or bring back) Redis, NATS, every service, the web client and Envoy (logs in .run/)
	$(PY) -m devtools.stack up

# `make restart worker` as well as `make restart NAME=worker`: the words after `restart` are
# names, not targets.
ifeq (restart,$(firstword $(MAKECMDGOALS)))
  RESTART_NAMES := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
  NAME ?= $(firstword $(RESTART_NAMES))
  $(eval $(RESTART_NAMES):;@:)
endif

.PHONY: restart
restart: $(STAMP) ## restart one component as it was started: make restart chat_svc (make status names them)
	@test -n "$(NAME)" || { echo "usage: make restart <component> (make status lists them)"; exit 2; }
	$(PY) -m devtools.stack restart $(NAME)

.PHONY: down
down: ## stop what `make up` started
	@if [ -x $(PY) ]; then $(PY) -m devtools.stack down; else echo "nothing to stop"; fi

.PHONY: mail
mail: $(STAMP) ## list the emails the dev mail sink received (make mail N=3 shows one)
	@if [ -n "$(N)" ]; then $(PY) -m devtools.mailsink show .run/mail $(N); \
	else $(PY) -m devtools.mailsink list .run/mail; fi

.PHONY: status
status: $(STAMP) ## show what runs where
	$(PY) -m devtools.stack status

.PHONY: clean
clean: down ## remove the venv, run folder and caches
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache .coverage* node_modules ui/dist build
