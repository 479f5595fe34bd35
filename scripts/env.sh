# Sourced by the other scripts: creates ./.venv with what the calling script
# needs (EXTRAS, pyproject.toml's optional dependencies; first run or after
# pyproject.toml changes), then activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating $VENV with $($PYTHON --version)" >&2
    "$PYTHON" -m venv "$VENV"
fi
EXTRAS="${EXTRAS:-test,baseline}"
HASH="$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
STAMP="$VENV/.installed-$HASH-${EXTRAS//,/-}"
if [ ! -f "$STAMP" ]; then
    echo "Installing dependencies into $VENV (about a minute)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # The CPU build of TensorFlow, pinned (the baseline's tf-keras must match it).
    "$VENV/bin/python" -m pip install -q "tensorflow-cpu==2.21.0"
    [[ "$EXTRAS" == *baseline* ]] && "$VENV/bin/python" -m pip install -q "tf-keras==2.21.0"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
    find "$VENV" -maxdepth 1 -name '.installed-*' ! -name ".installed-$HASH-*" -delete
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$ROOT"
