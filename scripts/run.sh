#!/usr/bin/env bash
# The main job: DG2PF on the embedded default (digits, small CNN), offline, in ./.venv.
EXTRAS=train source "$(dirname "$0")/env.sh"
exec python train.py "$@"
