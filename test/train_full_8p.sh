#!/bin/bash
# Full training on 8 devices (--nproc=N to change) under torchrun, reports FPS and best top-1.
# Usage and options: bash test/train_full_8p.sh --help (shared logic in test/common.sh).
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
epochs=300           # the port's schedule: 300 cosine epochs + main.py's 10 cooldown epochs = 310
launch 8p acc "$@"
