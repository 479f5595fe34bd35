#!/usr/bin/env bash
# Runs Bazel offline with its Python pointed at ./.venv (created if needed):
#   bash scripts/bazel.sh test //...              all test targets
#   bash scripts/bazel.sh test //:test_criteria_magnitude   one of them
# The repositories Bazel 4 would download are replaced by the small local
# ones under third_party/bazel/.
source "$(dirname "$0")/env.sh"
command -v bazel >/dev/null 2>&1 || {
    echo "bazel is not installed: apt-get install bazel-bootstrap (Debian, Bazel 4.2.3)" >&2
    exit 2
}
cmd="$1"; shift
overrides=()
for repo in rules_cc rules_java remote_coverage_tools; do
    overrides+=("--override_repository=$repo=$ROOT/third_party/bazel/$repo")
done
exec bazel "$cmd" "${overrides[@]}" --python_path="$VENV/bin/python" \
    --action_env=TF_CPP_MIN_LOG_LEVEL=2 "$@"
