#!/usr/bin/env bash
# The test command (README, and .ci/run): prepares .venv on first use, then runs the whole suite.
# Extra arguments go to pytest, e.g.  tests/run.sh -k config -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/jobs/bootstrap.sh"
exec "$PY" -m pytest "$root/tests" "$@"
