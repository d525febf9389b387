#!/usr/bin/env bash
# Train on this machine: NPROC ranks (default: one per GPU, or 2 without GPUs), the same arguments as `lm2 train`.
#
#   launch/local.sh --config configs/tiny.yaml [--resume auto|CHECKPOINT] [section.key=value ...]
#   NPROC=4 launch/local.sh --config configs/tiny.yaml parallel.tp=2
#
# SIGTERM or SIGUSR1 to this script (or to its process group) makes every rank save a checkpoint at the next step
# boundary; the script then exits with the requeue code (75). A rank that fails stops the others. The launcher is
# lm2's own (`lm2 launch local`, pipeline/launch/local.py), not torchrun: torchrun's agent kills the ranks 30 s after SIGTERM, whatever
# the save still needs, dies on SIGUSR1, and turns every rank failure into exit code 1.
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  NPROC="$(python -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
exec lm2 launch local --nproc "$NPROC" -- "$@"
