# Strata: `make quickstart` trains a small model from scratch on CPU; `make test` runs the suite.
PYTHON := .venv/bin/python
ENV_READY := .venv/.strata-ready
QS := data/quickstart
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
export PYTHONPATH := $(CURDIR)

.PHONY: env quickstart test lint format clean-quickstart

env: $(ENV_READY)

$(ENV_READY): pyproject.toml setup_uv_env.sh
	./setup_uv_env.sh
	touch $@

# The corpus is the standard library of the interpreter itself: nothing to download.
$(QS)/stdlib.jsonl: | $(ENV_READY)
	$(PYTHON) tools/datasets/stdlib_corpus.py --output $@

$(QS)/tokenizer.json: $(QS)/stdlib.jsonl
	$(PYTHON) tools/train_tokenizer.py --input $< --vocab-size 8192 --output $@

$(QS)/stdlib_text_document.bin: $(QS)/stdlib.jsonl $(QS)/tokenizer.json
	$(PYTHON) tools/datasets/preprocess_data.py --input $< --output-prefix $(QS)/stdlib \
		--tokenizer-type HFTokenizer --vocab-file $(QS)/tokenizer.json --append-eod --workers 2

quickstart: $(QS)/stdlib_text_document.bin
	rm -rf checkpoints/quickstart logs/quickstart
	$(PYTHON) deepy.py train.py configs/quickstart.yml
	$(PYTHON) deepy.py generate.py configs/quickstart.yml load=checkpoints/quickstart \
		text_gen_type=unconditional maximum_tokens=96 temperature=0.8 top_k=40 \
		sample_output_file=logs/quickstart/samples.jsonl

# Bytecode first: the suite launches hundreds of processes that import the repository.
test: $(ENV_READY)
	$(PYTHON) -m compileall -q megatron tools
	$(PYTHON) -m pytest -q -rs tests

lint: $(ENV_READY)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(ENV_READY)
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
