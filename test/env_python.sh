# Sourced by test/demo.sh and test/unit_tests.sh (never run on its own):
#   use_python_env <requirement file relative to the repo>...
# exports PYTHON (read by test/common.sh), plus VIRTUAL_ENV and PATH when that interpreter lives in a
# virtual environment, for an interpreter that meets the requirement files: the current one when it
# does, else <repo>/.venv (or $VAN_VENV), created or updated as needed. tools/ensure_env.py decides
# and prints the one line saying which; this only finds a python3 to run it with.
use_python_env() {
    local repo_root base exports
    repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    base=$(command -v python3 || command -v python) || {
        echo "error: no python3 (or python) on PATH; install Python 3 (README.md says which versions)" >&2
        return 1
    }
    exports=$("$base" "$repo_root/tools/ensure_env.py" "${@/#/$repo_root/}") || return
    eval "$exports"
}
