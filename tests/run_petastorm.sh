#!/usr/bin/env bash
# The petastorm loader's tests in the second, legacy environment (.venv-petastorm: pyarrow 14, petastorm
# 0.12.1; prepared on first use, several minutes): both loaders give the same shards and batches, and one
# tiny job runs end to end through TorchDistributor with loader.kind = petastorm. Run by .ci/run after the
# main suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/jobs/bootstrap_petastorm.sh"
exec "$PY" -m pytest "$root/tests/test_loader_petastorm.py" "$@"
