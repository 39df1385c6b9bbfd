#!/bin/bash
# Performance run on 8 devices (--nproc=N to change) under torchrun: 1 epoch, reports FPS.
# Usage and options: bash test/train_performance_8p.sh --help (shared logic in test/common.sh).
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
epochs=1
cooldown_epochs=0    # exactly one epoch: no cooldown epochs after it
launch 8p perf "$@"
