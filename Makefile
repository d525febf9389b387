# Entry points (README quickstart): `make quickstart` and `make test-all` (what CI runs; `make test` is its fast
# tier). All set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2
RUN := runs/tiny

.PHONY: setup quickstart data train resume export babilong lint test test-all test-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The embedded default, end to end on CPU: tokenizer, shards, training on $(NPROC) gloo ranks with
# checkpoints, then a resume that continues the run from its newest checkpoint to 250 steps (a schedule change,
# so --override-schedule: the LR follows the 250-step schedule), then the export of the trained
# model as a verified Hugging Face folder, then a short BABILong evaluation of it.
quickstart: setup
	rm -rf $(RUN)
	$(MAKE) data train resume export babilong

data:
	$(BIN)/lm2 data tokenizer corpus --output $(RUN)/tokenizer.model --config configs/tiny.yaml
	$(BIN)/lm2 data prepare corpus --tokenizer $(RUN)/tokenizer.model --output $(RUN)/data \
		--config configs/tiny.yaml --val-fraction 0.2 --workers 2

# launch/local.sh: one process per rank; SIGTERM/SIGUSR1 make the ranks save and exit 75 (docs/checkpoints.md).
LOCAL := NPROC=$(NPROC) PATH="$(abspath $(BIN)):$$PATH" launch/local.sh

train:
	$(LOCAL) --config configs/tiny.yaml

resume:
	$(BIN)/lm2 ckpt inspect $(RUN)/checkpoints
	$(LOCAL) --config configs/tiny.yaml --resume auto --override-schedule train.steps=250

export:
	$(BIN)/lm2 export hf $(RUN)/checkpoints $(RUN)/hf --force --verify
	@echo "Hugging Face model in $(RUN)/hf: AutoModelForCausalLM.from_pretrained(\"$(RUN)/hf\", trust_remote_code=True)"

# One task at two lengths, 20 questions each: a smoke test of the exported model (the tiny model never saw
# bAbI; expect accuracies near 0). The haystack is the embedded corpus.
babilong:
	$(BIN)/lm2 eval babilong --model $(RUN)/hf --tasks qa1 --lengths 0k,1k --samples 20 --output $(RUN)/babilong
	@echo "BABILong table: $(RUN)/babilong/results.md, heatmap: $(RUN)/babilong/heatmap.png"

# The LM2-vs-vanilla experiment: its targets, configs and scripts live in experiments/babilong/.
include experiments/babilong/experiment.mk

# Tests run on 2 pytest-xdist workers; a module whose tests share a cluster, a server or trained runs stays on one
# (xdist_group). make test: every feature once, about 3 minutes on 2 cores. make test-all (CI): also the tests
# marked slow, i.e. the other layouts and launchers of the same features, and the real SLURM cluster (about 14-15 minutes).
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: setup
	$(PYTEST) -m "not gpu and not slow"

test-all: lint
	$(PYTEST) -m "not gpu"

# The GPU path (nccl, bf16, flash attention) on a machine with CUDA devices; skipped without one.
test-gpu: setup
	$(BIN)/python -m pytest -m gpu -q -p no:cacheprovider

clean:
	rm -rf runs
