#!/bin/bash
# Evaluates a checkpoint on one device: bash test/train_eval_1p.sh DATA_DIR CKPT (or --data_path= --pth_path=).
# Usage and options: bash test/train_eval_1p.sh --help (shared logic in test/common.sh).
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
launch 1p eval "$@"
