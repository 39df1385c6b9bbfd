#!/usr/bin/env bash
# One prepared GPU measurement of VAN (issue 17) in under 8 minutes: throughput of every configuration
# (NCHW/channels_last, float16/bfloat16, cudnn.benchmark, eager/torch.compile, each lka_impl, batch 128/256),
# a per-kernel-class profile of a training step and main.py's FPS. The work is tools/gpu_report.py's; this
# only picks the interpreter and the output folder and adds a hard stop 30 s after the budget.
#
# Usage (from anywhere; a relative OUTPUT_DIR is taken from the repository root):
#   bash tools/gpu_benchmark.sh [OUTPUT_DIR] [tools/gpu_report.py options]
#   bash tools/gpu_benchmark.sh                              # -> output/gpu_report/{report.json,report.md,logs/}
#   bash tools/gpu_benchmark.sh /tmp/dry --dry-run           # the same plan on CPU, van_b0 at 32 px (plumbing)
#   bash tools/gpu_benchmark.sh out --steps reference,main-reference    # a subset (--list shows the steps)
#   bash tools/gpu_benchmark.sh out --data-dir /tmp/van_synthetic       # keep the 200 MB of JPEGs elsewhere
# Environment: PYTHON (default python), BUDGET_S (default 470 s). With no GPU or no triton it exits 2 at once.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-470}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: no Python interpreter '$PYTHON'; set PYTHON=/path/to/python" >&2
    exit 2
fi
OUT=output/gpu_report
if [[ $# -gt 0 && $1 != -* ]]; then
    OUT=$1
    shift
fi
timeout --kill-after=10 $(( ${BUDGET_S%.*} + 30 )) "$PYTHON" tools/gpu_report.py --out "$OUT" --budget-s "$BUDGET_S" "$@"
