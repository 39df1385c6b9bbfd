#!/bin/bash
# Fine-tunes from a pretrained file (--pth_path=, e.g. an official van_base_828.pth.tar) on one device; the head is resized to the dataset's classes.
# Usage and options: bash test/train_finetune_1p.sh --help (shared logic in test/common.sh).
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
pth_required=1
epochs=30            # fine-tuning needs far fewer epochs than training from scratch (+10 cooldown)
launch 1p acc "$@"
