#!/bin/bash
# Full training on 8 devices (--nproc=N to change) under torchrun, reports FPS and best top-1.
# Usage and options: bash test/train_full_8p.sh --help (shared logic in test/common.sh).
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
epochs=310           # the port's schedule: 300 cosine epochs + 10 cooldown epochs
launch 8p acc "$@"
