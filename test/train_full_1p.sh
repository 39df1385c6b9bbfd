#!/bin/bash
# Full training on one device (the port's 8p recipe on 1 device), reports FPS and best top-1.
# Usage and options: bash test/train_full_1p.sh --help (shared logic in test/common.sh).
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
epochs=300           # the port's schedule: 300 cosine epochs + main.py's 10 cooldown epochs = 310
launch 1p acc "$@"
