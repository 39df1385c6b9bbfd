#!/bin/bash
# README.md's test command: `python -m pytest` in the repository root (arguments go to pytest; test
# paths are taken relative to where this script was called from), after making sure Python has
# requirements.txt and requirements-dev.txt (test/env_python.sh). The exit status is pytest's,
# including 5 when no test was collected (.ci/run counts that as a failure).
TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$TEST_DIR/env_python.sh"
use_python_env requirements.txt requirements-dev.txt || exit

args=()
for arg in "$@"; do
    # test/unit/test_x.py::test_y given from test/ or elsewhere: make it absolute before the cd.
    [[ $arg != -* && $arg != /* && -e ${arg%%::*} ]] && arg=$PWD/$arg
    args+=("$arg")
done
cd "$TEST_DIR/.." || exit 1
exec "$PYTHON" -m pytest "${args[@]}"
