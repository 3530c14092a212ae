# `make serve` and `make test` install on first use, then are quick no-ops.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/local.yaml
TOKEN_FILE := .llm_api_key

.PHONY: install serve test lint unit docs bench bench-routing clean image image-gpu image-cpu

install: $(STAMP)

# The GPU build of vLLM where nvidia-smi sees a GPU, else the CPU build at the same version, with
# the CPU build's fixes: scripts/install.sh, which the images (docker/) run too.
$(STAMP): pyproject.toml scripts/install.sh
	test -d $(VENV) || python3 -m venv $(VENV)
	scripts/install.sh --editable $(PY) auto test
	touch $(STAMP)

$(TOKEN_FILE):
	@umask 077; $(PY) -c "import secrets; print('sk-' + secrets.token_urlsafe(32))" > $(TOKEN_FILE)

# `python -m cluster serve` checks the config, sets the Serve settings Ray reads from the
# environment (cluster/runtime.py) and, on a host without a GPU, keeps a core for Ray's processes
# and the rest for the engine, then runs `serve run`, with Ctrl-C and SIGTERM taken however it was
# started (a script's background job inherits SIGINT ignored).
serve: $(STAMP) $(TOKEN_FILE)
	@export LLM_API_KEY="$${LLM_API_KEY:-$$(cat $(TOKEN_FILE))}"; \
	echo "API key: $$LLM_API_KEY  (from \$$LLM_API_KEY, else $(TOKEN_FILE))"; \
	echo "try:  curl -H \"Authorization: Bearer $$LLM_API_KEY\" http://127.0.0.1:8000/llm -d '{\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of France?\"}]}'"; \
	$(PY) -m cluster serve $(CONFIG)

# Lint, the import contracts, the fast tier, then everything (the fast tier is not run twice),
# with the forty slowest steps named at the end.
test: lint unit
	$(PY) -m pytest -v -m e2e --durations=40

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint docker/Dockerfile.gpu docker/Dockerfile.cpu

# The fast tier: every test that starts no Ray cluster and loads no model.
unit: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

# docs/configuration.md from the field descriptions in cluster/schema/ (a unit test fails when
# the page is out of date).
docs: $(STAMP)
	$(PY) -m cluster docs --write

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# Beside `make bench`, not in it: the routing policies over two replicas of the real engine
# (bench/routing.py), four fresh deployments, a run of its own length.
bench-routing: $(BENCH_STAMP)
	$(PY) -m bench.routing $(ROUTING_ARGS)

# The images, on Ray's at the Ray that pyproject.toml pins, tagged with this project's name and
# version: <name>:<version>-gpu is the image `python -m cluster render kuberay` names by default.
# They build where a Docker daemon runs; they install with scripts/install.sh, as `make` does.
PROJECT     = $(shell awk -F'"' '/^name = /{print $$2; exit}' pyproject.toml)
VERSION     = $(shell awk -F'"' '/^version = /{print $$2; exit}' pyproject.toml)
RAY_VERSION = $(shell sed -n 's/.*"ray\[serve\]==\([^"]*\)".*/\1/p' pyproject.toml)
IMAGE       = $(PROJECT):$(VERSION)

image: image-gpu image-cpu

image-gpu image-cpu: image-%:
	@docker info >/dev/null 2>&1 || { echo "make $@: no Docker daemon answers here (\`docker info\` failed); build the images where Docker runs" >&2; exit 1; }
	docker build --build-arg RAY_VERSION=$(RAY_VERSION) -f docker/Dockerfile.$* -t $(IMAGE)-$* .

clean:
	rm -rf $(VENV) $(TOKEN_FILE)
