#!/bin/bash
# Evaluates a checkpoint on 8 devices (--nproc=N to change): bash test/train_eval_8p.sh DATA_DIR CKPT.
# Usage and options: bash test/train_eval_8p.sh --help (shared logic in test/common.sh).
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
launch 8p eval "$@"
