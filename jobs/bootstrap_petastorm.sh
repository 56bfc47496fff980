#!/usr/bin/env bash
# Make (or reuse) the second virtual environment, .venv-petastorm, for `loader: petastorm`.
#   source jobs/bootstrap_petastorm.sh   -> sets PY to that environment's python
# petastorm 0.12 needs pyarrow < 15, which pulls pyspark, numpy and datasets back to older releases:
# conf/env/constraints-petastorm.txt pins that set (the one Databricks Runtime ML 15.4 LTS resembles).
# A cold install takes several minutes (pyspark 4.0.5 is a large source archive built on install).
# SPARK_TUNING_PETASTORM_VENV moves the environment; SPARK_TUNING_PYTHON is ignored here on purpose, since
# it names the main environment's interpreter.
_pst_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SPARK_TUNING_PYTHON="" \
SPARK_TUNING_VENV="${SPARK_TUNING_PETASTORM_VENV:-$_pst_root/.venv-petastorm}" \
SPARK_TUNING_CONSTRAINTS="$_pst_root/conf/env/constraints-petastorm.txt" \
SPARK_TUNING_EXTRAS="dev,petastorm" \
  source "$_pst_root/jobs/bootstrap.sh"
