#!/usr/bin/env bash
# VAN throughput on one CUDA GPU, in under 8 minutes, with nothing beyond requirements.txt:
#   1. tools/benchmark.py, van_b2, batch 128, AMP float16 and bfloat16: plain vs fast (train + infer);
#   2. the same with torch.compile rows (bfloat16, training step);
#   3. a short main.py training run on a synthetic 224px ImageFolder it generates, printing FPS.
# Usage (repository root):  bash tools/gpu_benchmark.sh [OUTPUT_DIR]     (PYTHON=... to pick the interpreter)
# Every step has its own time limit and the whole script stops at 470 s; a failing step stops it at once.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-output/gpu_benchmark}
DEADLINE=$(( $(date +%s) + 470 ))
mkdir -p "$OUT"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with min(limit, time left); stop the script on failure
    local name=$1 limit=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then echo "=== $name: SKIPPED (8-minute budget used up)"; return 0; fi
    echo "=== $name (limit ${limit}s): $*"
    local start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if (( rc == 124 || rc == 137 )); then
        echo "=== $name: TIMED OUT after ${limit}s (results above are partial)"; return 0
    elif (( rc != 0 )); then
        echo "=== $name: FAILED (exit $rc); stopping."; exit "$rc"
    fi
    echo "=== $name: done in $(( $(date +%s) - start ))s"
}

step "environment" 60 "$PYTHON" -c "
import sys, torch, timm
assert torch.cuda.is_available(), 'no CUDA device visible to torch ' + torch.__version__
print('python', sys.version.split()[0], '| torch', torch.__version__, '| timm', timm.__version__,
      '| GPU', torch.cuda.get_device_name(0), '| cuDNN', torch.backends.cudnn.version())
import models"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

BENCH=("$PYTHON" tools/benchmark.py --model van_b2 -b 128 --img-size 224 --device cuda --warmup 3 --repeats 10)
step "benchmark float16 (AMP)" 75 "${BENCH[@]}" --dtype float16 --json "$OUT/float16.json"
step "benchmark bfloat16 (AMP)" 75 "${BENCH[@]}" --dtype bfloat16 --json "$OUT/bfloat16.json"
step "benchmark bfloat16 + torch.compile (train)" 150 "${BENCH[@]}" --dtype bfloat16 --mode train --compile \
    --json "$OUT/bfloat16_compile.json"

DATA="$OUT/synthetic_imagefolder"
step "synthetic ImageFolder" 40 "$PYTHON" - "$DATA" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for split, per_class in (('train', 640), ('val', 32)):
    for label in range(4):
        folder = root / split / f'class{label}'
        folder.mkdir(parents=True, exist_ok=True)
        have = len(list(folder.glob('*.jpg')))
        for i in range(have, per_class):  # created once; reruns reuse it
            pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            pixels[:, :, label % 3] //= 2  # a faint class signal
            Image.fromarray(pixels).save(folder / f'{i}.jpg', quality=90)
print('ImageFolder ready:', root)
EOF

step "main.py training (FPS)" 120 "$PYTHON" main.py --data_path "$DATA" --model van_b2 -b 128 --amp \
    --device cuda --epochs 1 --warmup-epochs 0 --cooldown-epochs 0 --max-steps-per-epoch 20 -j 8 --output "$OUT" --experiment main_run \
    --log-interval 5
echo "=== all steps finished in $(( $(date +%s) - DEADLINE + 470 ))s; JSON results in $OUT"
