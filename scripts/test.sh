#!/usr/bin/env bash
# Runs the whole test suite (slow end-to-end tests included) in ./.venv, on two
# worker processes: much of a test's time is single-threaded (tracing, Python),
# so two of them keep both cores busy. Pass -n 0 to run in this process.
# --fast leaves out the tests marked slow (a few minutes; CI runs them all).
source "$(dirname "$0")/env.sh"
args=()
for arg in "$@"; do
    if [[ "$arg" == "--fast" ]]; then args+=(-m "not slow"); else args+=("$arg"); fi
done
exec python -m pytest -q -n 2 --dist worksteal "${args[@]}"
