#!/bin/bash
# Performance run on one device: 1 epoch, reports FPS (ModelZoo case ..._1p_perf).
# Usage and options: bash test/train_performance_1p.sh --help (shared logic in test/common.sh).
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
epochs=1
cooldown_epochs=0    # exactly one epoch: no cooldown epochs after it
launch 1p perf "$@"
