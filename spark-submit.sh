#!/usr/bin/env bash
# Run the fine-tuning job with spark-submit.
#
#   ./spark-submit.sh                                   quickstart: conf/quickstart.yaml, local[*], offline
#   ./spark-submit.sh conf/imdb_gpt2.yaml --set data.train_limit=1000
#   ./spark-submit.sh conf/x.yaml --master spark://host:7077 -- --executor-memory 8g
#
# Arguments:
#   CONFIG.yaml          the job's config (default conf/quickstart.yaml)
#   --set KEY=VALUE      override a config value (repeatable), e.g. --set train.learning_rate=3e-5
#   --overwrite          replace an output folder that already holds a model
#   --resume             continue an interrupted run from its newest complete checkpoint (automatic
#                        when the config is unchanged)
#   --master URL         Spark master (default local[*]); on a cluster the package travels as a zip
#                        (--py-files) and the config with --files
#   -- OPTIONS...        everything after -- goes to spark-submit unchanged
#   -h, --help           this text
#
# On first use it creates .venv with the tested stack (jobs/bootstrap.sh); set SPARK_TUNING_PYTHON to use
# an interpreter that already has it. The command it runs is printed before it runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="" master="local[*]" job_args=() submit_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --set) [[ $# -ge 2 ]] || { echo "spark-submit.sh: --set needs KEY=VALUE" >&2; exit 2; }
           job_args+=(--set "$2"); shift 2 ;;
    --set=*) job_args+=(--set "${1#--set=}"); shift ;;
    --overwrite|--resume) job_args+=("$1"); shift ;;
    --master) [[ $# -ge 2 ]] || { echo "spark-submit.sh: --master needs a URL" >&2; exit 2; }
              master="$2"; shift 2 ;;
    --) shift; submit_args+=("$@"); break ;;
    *.yaml|*.yml) config="$1"; shift ;;
    *) echo "spark-submit.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
config="${config:-$root/conf/quickstart.yaml}"
[[ -f "$config" ]] || { echo "spark-submit.sh: config file '$config' does not exist" >&2; exit 2; }

source "$root/jobs/bootstrap.sh"
submit="$(dirname "$PY")/spark-submit"
[[ -x "$submit" ]] || submit="$("$PY" -c 'import pyspark,os;print(os.path.join(os.path.dirname(pyspark.__file__),"bin","spark-submit"))')"

cmd=("$submit" --master "$master" --conf "spark.pyspark.python=$PY" --conf "spark.pyspark.driver.python=$PY"
     --driver-java-options "-Dlog4j2.configurationFile=file:$root/conf/env/log4j2.properties")
if [[ "$master" != local* ]]; then
  # Executors on other machines get the package as a zip and the config beside their working folder.
  mkdir -p "$root/build"
  (cd "$root" && rm -f build/spark_tuning.zip && "$PY" -m zipfile -c build/spark_tuning.zip spark_tuning >/dev/null)
  cmd+=(--py-files "$root/build/spark_tuning.zip" --files "$config")
fi
cmd+=("${submit_args[@]}" "$root/jobs/finetune.py" --config "$config" "${job_args[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
