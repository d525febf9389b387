# The BABILong experiment (docs/experiment/README.md), included by the repository's Makefile: run its targets from
# the repository root. Three models of one tiny backbone, trained on the same bAbI qa1 samples in book haystacks
# with the loss on the answer only and a curriculum over segment counts, evaluated at 0k-16k tokens:
#   lm2           memory in every block, segments of S = 128 tokens (lm2.yaml); lm2-seed1: another seed of it
#   vanilla-span  no memory, attention over the last S tokens (vanilla-span.yaml)
#   vanilla-full  no memory, attention over LM2's 2048-token training rows (vanilla-full.yaml)
# SHARED holds the books and bAbI files; the evaluation reads lm2's held-out stories and the corpus/ books, which
# the training data never uses.
SHARED ?= ../shared
EXPERIMENT := experiments/babilong
EXP := runs/babilong
# Books of ../shared/data/text that are not in corpus/ (the evaluation's haystack); chesterton-ball.txt and
# shakespeare-caesar.txt are left out: they are not valid UTF-8.
EXP_BOOKS := $(addprefix $(SHARED)/data/text/,austen-sense.txt melville-moby_dick.txt milton-paradise.txt)
# Stage n: samples of at most n segments of 128 tokens, as many as its steps read (16 a step) and 2 % for val.
EXP_STAGES := 1:100000 2:6600 4:6600 8:4900 16:4100
EXP_MODELS := lm2 lm2-seed1 vanilla-span vanilla-full
EXP_EVAL := --tasks qa1 --lengths 0k,1k,2k,4k,8k,16k --samples 200
.PHONY: experiment experiment-data experiment-report $(addprefix experiment-,$(EXP_MODELS))

experiment: experiment-data $(addprefix experiment-,$(EXP_MODELS)) experiment-report

experiment-data: setup
	rm -rf $(EXP)
	$(BIN)/lm2 data tokenizer $(EXP_BOOKS) --output $(EXP)/tokenizer.model --config $(EXPERIMENT)/lm2.yaml
	for stage in $(EXP_STAGES); do n=$${stage%%:*}; \
	  $(BIN)/lm2 data babilong --output $(EXP)/stage$$n.jsonl --tokenizer $(EXP)/tokenizer.model --books $(EXP_BOOKS) \
	    --babi $(SHARED)/data/babi --tasks qa1 --max-tokens $$((n * 128)) --samples-per-task $${stage##*:} \
	    --seed $$n && \
	  $(BIN)/lm2 data prepare $(EXP)/stage$$n.jsonl --tokenizer $(EXP)/tokenizer.model --output $(EXP)/rows$$n \
	    --row-length $$((n * 128)) --text-field prompt --answer-field answer --packing whole --val-fraction 0.02 && \
	  $(BIN)/lm2 data prepare $(EXP)/stage$$n.jsonl --tokenizer $(EXP)/tokenizer.model --output $(EXP)/span$$n \
	    --row-length 128 --text-field prompt --answer-field answer --packing whole --truncate --val-fraction 0.02 \
	  || exit 1; done

# Each model trains on one process (NPROC=1): two can train at once on two cores, e.g. make -j2.
experiment-lm2-seed1: EXP_CONFIG := lm2
experiment-lm2-seed1: EXP_OVERRIDES := train.seed=1 data.shuffle_seed=4321 logging.run_dir=runs/babilong-lm2-seed1
$(addprefix experiment-,$(EXP_MODELS)): experiment-%: setup
	NPROC=1 PATH="$(abspath $(BIN)):$$PATH" launch/local.sh --config $(EXPERIMENT)/$(or $(EXP_CONFIG),$*).yaml \
		$(EXP_OVERRIDES) --resume auto
	$(BIN)/lm2 export hf runs/babilong-$*/checkpoints runs/babilong-$*/hf --force --verify
	$(BIN)/lm2 eval babilong --model runs/babilong-$*/hf $(EXP_EVAL) --device cpu --output runs/babilong-$*/babilong
	case $* in lm2*) $(BIN)/lm2 eval memory --model runs/babilong-$*/hf --text corpus --segments 256 \
		--device cpu --output runs/babilong-$*/memory;; esac

# Tables and plots of the four models into docs/experiment/, and the exported models beside them.
experiment-report: setup
	$(BIN)/python $(EXPERIMENT)/report.py --runs runs --output docs/experiment $(EXP_MODELS)
