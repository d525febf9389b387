# Entry points (README quickstart): `make quickstart` and `make test-all` (what CI runs; `make test` is its fast
# tier). All set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2
RUN := runs/tiny

.PHONY: setup quickstart data train resume export babilong test test-all test-gpu clean \
	experiment experiment-data experiment-lm2 experiment-vanilla

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

# launch/local.sh: one process per rank; SIGTERM/SIGUSR1 make the ranks save and exit 75 (see README).
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

# The LM2-vs-vanilla experiment (README, Evaluation): one mixture, two models of one backbone and token budget,
# BABILong qa1-qa5 at 0k-8k. About 35 minutes of training per model on two idle cores (docs/experiment/).
# SHARED holds the books and bAbI files.
SHARED ?= ../shared
EXP := runs/babilong
# Books of ../shared/data/text that are not in corpus/ (the evaluation's haystack); chesterton-ball.txt and
# shakespeare-caesar.txt are left out: they are not valid UTF-8.
EXP_BOOKS := $(addprefix $(SHARED)/data/text/,austen-sense.txt melville-moby_dick.txt milton-paradise.txt)
EXP_EVAL := --tasks qa1,qa2,qa3,qa4,qa5 --lengths 0k,1k,2k,4k,8k --samples 100

experiment: experiment-data experiment-lm2 experiment-vanilla

experiment-data: setup
	rm -rf $(EXP)
	$(BIN)/lm2 data tokenizer $(EXP_BOOKS) --output $(EXP)/tokenizer.model --config configs/babilong-lm2.yaml
	$(BIN)/lm2 data babilong --output $(EXP)/mixture.jsonl --tokenizer $(EXP)/tokenizer.model --books $(EXP_BOOKS) \
		--babi $(SHARED)/data/babi --row-length 256 --tasks qa1,qa2,qa3,qa4,qa5
	$(BIN)/lm2 data prepare $(EXP)/mixture.jsonl --tokenizer $(EXP)/tokenizer.model --output $(EXP)/data \
		--config configs/babilong-lm2.yaml --val-fraction 0.02 --workers 2 --packing whole

experiment-lm2 experiment-vanilla: experiment-%: setup
	$(LOCAL) --config configs/babilong-$*.yaml
	$(BIN)/lm2 export hf runs/babilong-$*/checkpoints runs/babilong-$*/hf --force --verify
	$(BIN)/lm2 eval babilong --model runs/babilong-$*/hf $(EXP_EVAL) --output runs/babilong-$*/babilong

# Tests run on 2 pytest-xdist workers; a module whose tests share a cluster, a server or trained runs stays on one
# (xdist_group). make test: every feature once, about 3 minutes on 2 cores. make test-all (CI): also the tests
# marked slow, i.e. the other layouts and launchers of the same features, and the real SLURM cluster (about 14-15 minutes).
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

test: setup
	$(PYTEST) -m "not gpu and not slow"

test-all: setup
	$(PYTEST) -m "not gpu"

# The GPU path (nccl, bf16, flash attention) on a machine with CUDA devices; skipped without one.
test-gpu: setup
	$(BIN)/python -m pytest -m gpu -q -p no:cacheprovider

clean:
	rm -rf runs
