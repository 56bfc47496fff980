#!/usr/bin/env bash
# Runs every benchmark and writes bench/RESULTS.md:  bench/run.sh [--quick]
#   --quick: small sizes, about 10-15 minutes on a busy 2-core machine; full: the sizes the issue names.
# Each benchmark runs on its own, under a timeout, loopback only (local Spark, offline models); a failed or
# timed-out one is reported in RESULTS.md and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/work/main/.venv/bin/python}
MODE=full; ARGS=()
if [[ "${1:-}" == "--quick" ]]; then MODE=quick; ARGS=(--quick); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=bench/out; rm -rf "$OUT"; mkdir -p "$OUT"
START=$(date -u +%FT%TZ); LOAD0=$(cut -d' ' -f1-3 /proc/loadavg); T0=$SECONDS
status=()
for spec in bench_tokenize:900 bench_train:1200 bench_infer:600 bench_job:900; do
  name=${spec%%:*}; limit=${spec##*:}
  echo "== $name ($MODE, timeout ${limit}s) =="
  t=$SECONDS
  timeout "$limit" "$PY" "bench/$name.py" "${ARGS[@]}" >"$OUT/$name.log" 2>&1
  rc=$?
  status+=("| $name | $rc | $((SECONDS - t)) |")
  [[ $rc -eq 0 ]] || echo "   $name failed (exit $rc): see $OUT/$name.log"
done
{
  echo "# spark-tuning benchmarks"
  echo
  echo "Written by \`bench/run.sh${ARGS:+ --quick}\` (mode: **$MODE**), started $START, $((SECONDS - T0)) s in all."
  echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB;"
  echo "load average (1/5/15 min) at the start $LOAD0, at the end $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Versions: $("$PY" -c 'import torch, transformers, pyspark, datasets; print(f"torch {torch.__version__}, transformers {transformers.__version__}, pyspark {pyspark.__version__}, datasets {datasets.__version__}")')."
  echo "Every table records the load it ran under: on a shared machine absolute figures move with it;"
  echo "compare the alternatives measured side by side (the ratios), which were interleaved."
  echo
  echo "| script | exit | seconds |"; echo "|---|---|---|"; printf '%s\n' "${status[@]}"
  echo
  for f in 1_tokenize 2_train 3_loader 4_scaling 5_infer 6_end_to_end; do
    [[ -f "$OUT/$f.md" ]] && { cat "$OUT/$f.md"; echo; } || echo -e "## $f\n\nNot produced in this run (see the script's log).\n"
  done
} > bench/RESULTS.md
echo "wrote bench/RESULTS.md"
