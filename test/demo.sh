#!/bin/bash
# README.md's quick start: trains VAN-B0 on the offline demo digits (scikit-learn, written to data/demo
# on first use) through test/train_full_1p.sh, after making sure Python has requirements.txt (the
# current interpreter when it does, else <repo>/.venv, created or updated: test/env_python.sh).
# Arguments go to train_full_1p.sh after the quick-start settings, so they win (e.g. --epochs=3).
TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$TEST_DIR/env_python.sh"
use_python_env requirements.txt || exit

# 8 epochs at 32x32, float32, light augmentation (the digits must not be mirrored or erased), and lr 1e-3
# as such (main.py would otherwise scale the ImageNet recipe's 1e-3 per 1024 images down to this batch).
quick_start=(--model=van_b0 --img-size=32 --batch-size=32 --epochs=8 --cooldown-epochs=0 --warmup-epochs=0
             --no-amp --workers=1 --mixup=0 --cutmix=0 --aa=none --reprob=0 --hflip=0 --lr=1e-3)
output=$(mktemp) || exit 1
trap 'rm -f "$output"' EXIT
bash "$TEST_DIR/train_full_1p.sh" "${quick_start[@]}" "$@" | tee "$output"
status=${PIPESTATUS[0]}
(( status == 0 )) || exit "$status"

# Where the results are: the lines the launch script printed along the way, gathered.
field() { sed -n "s/^$1//p" "$output" | tail -n 1; }
summary=$(field 'Summary: ')
[[ -n $summary ]] || exit 0   # --help: nothing was trained
run_dir=$(field 'Run dir (checkpoints, summary.csv): ')
echo "------------------ Demo results ------------------"
echo "Top-1 accuracy (best epoch, validation set): $(field 'Final Train Accuracy : ') %"
echo "Training log: $(field 'Log: ')"
echo "Summary:      $summary"
if [[ -n $run_dir ]]; then
    echo "Checkpoints:  $run_dir/model_best.pth.tar, last.pth.tar"
    if [[ -f $run_dir/curves.png ]]; then
        echo "Curves:       $run_dir/curves.png"
    else
        echo "Curves:       not written (the training log says why)"
    fi
fi
