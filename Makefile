# Two entry points (README quickstart): `make quickstart` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2
RUN := runs/tiny

.PHONY: setup quickstart data train resume export test test-all clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The embedded default, end to end on CPU: tokenizer, shards, training on $(NPROC) gloo ranks with
# checkpoints, then a resume that continues the run from its newest checkpoint, then the export of the trained
# model as a verified Hugging Face folder.
quickstart: setup
	rm -rf $(RUN)
	$(MAKE) data train resume export

data:
	$(BIN)/lm2 data tokenizer corpus --output $(RUN)/tokenizer.model --config configs/tiny.yaml
	$(BIN)/lm2 data prepare corpus --tokenizer $(RUN)/tokenizer.model --output $(RUN)/data \
		--config configs/tiny.yaml --val-fraction 0.2 --workers 2

# launch/local.sh: one process per rank; SIGTERM/SIGUSR1 make the ranks save and exit 75 (see README).
LOCAL := NPROC=$(NPROC) PATH="$(abspath $(BIN)):$$PATH" launch/local.sh

train:
	$(LOCAL) --config configs/tiny.yaml

resume:
	$(BIN)/lm2 ckpt inspect $(RUN)/checkpoints
	$(LOCAL) --config configs/tiny.yaml --resume auto train.steps=250

export:
	$(BIN)/lm2 export hf $(RUN)/checkpoints $(RUN)/hf --force --verify
	@echo "Hugging Face model in $(RUN)/hf: AutoModelForCausalLM.from_pretrained(\"$(RUN)/hf\", trust_remote_code=True)"

test: setup
	$(BIN)/python -m pytest -m "not gpu and not slow" -q -p no:cacheprovider

# Also the slow tests (layout changes through universal checkpoints: TP and PP).
test-all: setup
	$(BIN)/python -m pytest -m "not gpu" -q -p no:cacheprovider

clean:
	rm -rf runs
