#!/usr/bin/env bash
# Run the fine-tuning job with spark-submit, on this machine or on a Spark cluster.
#
#   ./spark-submit.sh                                   quickstart: conf/quickstart.yaml, local[*], offline
#   ./spark-submit.sh conf/x.yaml --set data.train_limit=1000 --set train.epochs=1
#   ./spark-submit.sh conf/x.yaml --master spark://host:7077 --set distributed.local_mode=false \
#       -- --executor-memory 8g --conf spark.task.cpus=4
#
# Arguments:
#   CONFIG.yaml          the job's config (default conf/quickstart.yaml)
#   --set KEY=VALUE      override a config value (repeatable), e.g. --set train.learning_rate=3e-5
#   --overwrite          replace the model in output_dir once the new one is complete
#   --master URL         Spark master. Without it: the config's spark.master, else local[*]. A master
#                        given here wins over the config's.
#   --resume             continue an interrupted run from its newest complete checkpoint, or fail
#                        (automatic when the config is unchanged, with or without --overwrite)
#   --fresh              discard an interrupted run's checkpoints and train from the start
#   --dry-run            check the config, print the spark-submit command, and stop
#   -- OPTIONS...        everything after -- goes to spark-submit unchanged (--conf k=v, --executor-memory,
#                        --deploy-mode, --packages, ...), before the job's own arguments
#   -h, --help           this text
#
# What travels to a cluster (any master that is not local[...]):
#   - the package: build/spark_tuning.zip, rebuilt when a file under spark_tuning/ is newer, given to
#     --py-files (the training processes on the executors import it from there);
#   - the config: given to --files (it lands in each container's working folder; the driver reads the
#     path given, or the copy in its working folder when the path does not exist there, as in
#     --deploy-mode cluster). The driver turns relative paths in the config into absolute ones;
#   - the data: the job stages tokenized data as Parquet under loader.staging_dir (default: beside
#     output_dir), which must be storage every node sees (NFS, /dbfs/..., /Volumes/...) when training runs
#     on executors (distributed.local_mode: false): the job refuses a node-local folder there;
#   - MLflow: the driver creates the run; the training processes log into it by run id and tracking URI.
#
# On first use it creates .venv with the tested stack (jobs/bootstrap.sh); set SPARK_TUNING_PYTHON to use
# an interpreter that already has it (the same path must exist on every node of a cluster). The command
# it runs is printed (to stderr, prefixed with "+ ") before it runs. Exit codes: 2 bad arguments or
# config, otherwise spark-submit's.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="" master="" dry_run=0 overwrite=0 job_args=() sets=() submit_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --set) [[ $# -ge 2 && "$2" != -* ]] || { echo "spark-submit.sh: --set needs KEY=VALUE" >&2; exit 2; }
           sets+=("$2"); shift 2 ;;
    --set=*) sets+=("${1#--set=}"); shift ;;
    --overwrite) overwrite=1; shift ;;
    --resume) job_args+=(--resume); shift ;;
    --fresh) job_args+=(--fresh); shift ;;
    --master) [[ $# -ge 2 && "$2" != -* ]] || { echo "spark-submit.sh: --master needs a URL" >&2; exit 2; }
              master="$2"; shift 2 ;;
    --master=*) master="${1#--master=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
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

# Check the config (with the overrides) now, in a second, and read its master when none was given.
for s in ${sets[@]+"${sets[@]}"}; do job_args+=(--set "$s"); done
[[ $overwrite -eq 1 ]] && job_args+=(--overwrite)
config_master="$(PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$config" ${sets[@]+"${sets[@]}"} <<'EOF'
import sys
from spark_tuning.config import load_config
from spark_tuning.errors import InputError
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except InputError as e:
    print(f"spark-submit.sh: {e}", file=sys.stderr)
    sys.exit(2)
print(cfg.spark.master or "")
EOF
)" || exit 2
master="${master:-${config_master:-local[*]}}"

cmd=("$submit" --master "$master" --conf "spark.pyspark.python=$PY" --conf "spark.pyspark.driver.python=$PY"
     --driver-java-options "-Dlog4j2.configurationFile=file:$root/conf/env/log4j2.properties")
if [[ "$master" != local* ]]; then
  # Executors on other machines get the package as a zip and the config in their working folder.
  zip="$root/build/spark_tuning.zip"
  if [[ ! -f "$zip" || -n "$(find "$root/spark_tuning" -newer "$zip" -not -path '*__pycache__*' -print -quit)" ]]; then
    mkdir -p "$root/build"
    "$PY" - "$root" "$zip" <<'EOF'
import os, sys, zipfile
root, zip_path = sys.argv[1], sys.argv[2]
tmp = f"{zip_path}.{os.getpid()}.tmp"  # one per submission: two at once must not write the same file
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
    for folder, dirs, files in os.walk(os.path.join(root, "spark_tuning")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith((".pyc", ".pyo")):
                path = os.path.join(folder, name)
                z.write(path, os.path.relpath(path, root))
os.replace(tmp, zip_path)
EOF
    echo "spark-submit.sh: built $zip" >&2
  else
    echo "spark-submit.sh: reusing $zip (nothing under spark_tuning/ is newer)" >&2
  fi
  cmd+=(--py-files "$zip" --files "$config")
fi
cmd+=(${submit_args[@]+"${submit_args[@]}"} "$root/jobs/finetune.py" --config "$config" ${job_args[@]+"${job_args[@]}"})
printf '+' >&2; printf ' %q' "${cmd[@]}" >&2; printf '\n' >&2
[[ $dry_run -eq 1 ]] && exit 0
exec "${cmd[@]}"
