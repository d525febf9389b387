# Included by the repository's Makefile: run these targets from the repository root.
EXPERIMENT := experiments/babilong
.PHONY: experiment experiment-data experiment-lm2 experiment-vanilla

# The LM2-vs-vanilla experiment (docs/experiment/README.md): one mixture, two models of one backbone and token budget,
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
	$(BIN)/lm2 data tokenizer $(EXP_BOOKS) --output $(EXP)/tokenizer.model --config $(EXPERIMENT)/babilong-lm2.yaml
	$(BIN)/lm2 data babilong --output $(EXP)/babi.jsonl --text --book-documents $(EXP)/books.jsonl \
		--tokenizer $(EXP)/tokenizer.model --books $(EXP_BOOKS) --babi $(SHARED)/data/babi --max-tokens 256 \
		--tasks qa1,qa2,qa3,qa4,qa5
	$(BIN)/lm2 data prepare $(EXP)/babi.jsonl $(EXP)/books.jsonl --tokenizer $(EXP)/tokenizer.model --output $(EXP)/data \
		--config $(EXPERIMENT)/babilong-lm2.yaml --val-fraction 0.02 --workers 2 --packing whole

experiment-lm2 experiment-vanilla: experiment-%: setup
	$(LOCAL) --config $(EXPERIMENT)/babilong-$*.yaml
	$(BIN)/lm2 export hf runs/babilong-$*/checkpoints runs/babilong-$*/hf --force --verify
	$(BIN)/lm2 eval babilong --model runs/babilong-$*/hf $(EXP_EVAL) --output runs/babilong-$*/babilong

