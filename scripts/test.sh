#!/usr/bin/env bash
# Runs the whole test suite (slow end-to-end tests included) in ./.venv.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
