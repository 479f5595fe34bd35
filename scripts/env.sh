# Sourced by the other scripts: creates ./.venv with everything the project
# needs (first run or after pyproject.toml changes), then activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating $VENV with $($PYTHON --version)" >&2
    "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    echo "Installing dependencies into $VENV (about a minute)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # The CPU build of TensorFlow, pinned; tf-keras must match it for the
    # tfmot baseline.
    "$VENV/bin/python" -m pip install -q "tensorflow-cpu==2.21.0" "tf-keras==2.21.0"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test,baseline]"
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$ROOT"
