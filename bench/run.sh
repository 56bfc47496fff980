#!/usr/bin/env bash
# Runs every benchmark and writes bench/RESULTS.md:  bench/run.sh [--quick] [--accuracy]
#   full (default): the sizes the issue names, under 20 minutes on a quiet 2-core machine.
#   --quick: small sizes, a few minutes (a smoke run: its ratios are noisier).
#   --accuracy: also bench_accuracy (accuracy after the same 1,024 examples, lab vs spark-tuning: about an
#     hour, the lab recipe being the slow part). Without it, RESULTS.md carries the section of the last
#     such run, kept in bench/accuracy.md, and says so.
#   --tasks: also bench_tasks (each task against a plain HF Trainer: about 20 minutes); without it, likewise
#     from bench/tasks.md.
#   --fsdp: also bench_fsdp (ddp vs fsdp memory and speed, 2 processes, SmolLM2-135M shape: about 6 minutes with
#     bf16 units, 13 without); without it, likewise from bench/fsdp.md.
#   --truncation: also bench_truncation (head vs head_tail accuracy on IMDB at max_length 128 and 256: about
#     15 minutes); without it, likewise from bench/truncation.md.
#   --time-to-target: also bench_time_to_target (the whole job against a tuned HF Trainer script, time to a
#     validation accuracy on IMDB: about 15 minutes); without it, likewise from bench/time_to_target.md.
#   --petastorm: also loader_backends (petastorm vs Parquet loader, in .venv-petastorm, which
#     jobs/bootstrap_petastorm.sh makes on first use: several minutes). Without it, likewise from
#     bench/loader_petastorm.md.
# Each benchmark runs on its own, under a timeout, loopback only (local Spark, offline models); a failed or
# timed-out one is reported in RESULTS.md and the others still run. Run it on an otherwise idle machine:
# every table records the load it ran under.
set -uo pipefail
cd "$(dirname "$0")/.."
source jobs/bootstrap.sh  # PY: the project's environment (made on first use)
MODE=full; ARGS=(); ACCURACY=0; PETASTORM=0; TASKS=0; FSDP=0; TRUNCATION=0; TTT=0
for a in "$@"; do
  case "$a" in
    --quick) MODE=quick; ARGS=(--quick) ;;
    --accuracy) ACCURACY=1 ;;
    --petastorm) PETASTORM=1 ;;
    --tasks) TASKS=1 ;;
    --fsdp) FSDP=1 ;;
    --truncation) TRUNCATION=1 ;;
    --time-to-target) TTT=1 ;;
    *) echo "usage: bench/run.sh [--quick] [--accuracy] [--petastorm] [--tasks] [--fsdp] [--truncation] [--time-to-target]" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=bench/out; rm -rf "$OUT"; mkdir -p "$OUT"
START=$(date -u +%FT%TZ); LOAD0=$(cut -d' ' -f1-3 /proc/loadavg); T0=$SECONDS
specs=(bench_tokenize:900 bench_train:1200 bench_infer:600 bench_job:900)
[[ $ACCURACY -eq 1 ]] && specs+=(bench_accuracy:5400)
[[ $TASKS -eq 1 ]] && specs+=(bench_tasks:2400)
[[ $FSDP -eq 1 ]] && specs+=(bench_fsdp:1800)
[[ $TRUNCATION -eq 1 ]] && specs+=(bench_truncation:2400)
[[ $TTT -eq 1 ]] && specs+=(bench_time_to_target:2400)
status=()
for spec in "${specs[@]}"; do
  name=${spec%%:*}; limit=${spec##*:}
  echo "== $name ($MODE, timeout ${limit}s) =="
  t=$SECONDS
  timeout "$limit" "$PY" "bench/$name.py" "${ARGS[@]}" >"$OUT/$name.log" 2>&1
  rc=$?
  status+=("| $name | $rc | $((SECONDS - t)) |")
  [[ $rc -eq 0 ]] || echo "   $name failed (exit $rc): see $OUT/$name.log"
done
if [[ $PETASTORM -eq 1 ]]; then
  echo "== loader_backends (petastorm environment, timeout 900s) =="
  t=$SECONDS
  ( source jobs/bootstrap_petastorm.sh && timeout 900 "$PY" bench/loader_backends.py --rounds 2 --rows 1000 --steps 20 ) \
    >"$OUT/loader_backends.log" 2>&1
  rc=$?
  status+=("| loader_backends (.venv-petastorm) | $rc | $((SECONDS - t)) |")
  [[ $rc -eq 0 ]] || echo "   loader_backends failed (exit $rc): see $OUT/loader_backends.log"
fi
# A section this run did not produce comes from the copy its script keeps, with a line saying so.
kept_section() {  # section, kept copy, why it did not run, script
  [[ ! -f "$OUT/$1.md" && -f "$2" ]] || return 0
  { head -n 1 "$2"; echo
    echo "_Not run by this run.sh ($3): what follows is $2, written by the last run of $4._"
    tail -n +2 "$2"; } > "$OUT/$1.md"
}
kept_section 2b_accuracy bench/accuracy.md "it takes about an hour: \`bench/run.sh --accuracy\`" bench/bench_accuracy.py
kept_section 7_tasks bench/tasks.md "it takes about 20 minutes: \`bench/run.sh --tasks\`" bench/bench_tasks.py
kept_section 8_fsdp bench/fsdp.md "it takes 6-13 minutes: \`bench/run.sh --fsdp\`" bench/bench_fsdp.py
kept_section 9_truncation bench/truncation.md "it takes about 15 minutes: \`bench/run.sh --truncation\`" \
  bench/bench_truncation.py
kept_section 10_time_to_target bench/time_to_target.md "it takes about 15 minutes: \`bench/run.sh --time-to-target\`" \
  bench/bench_time_to_target.py
kept_section 3b_loader_petastorm bench/loader_petastorm.md \
  "it needs .venv-petastorm: \`bench/run.sh --petastorm\`" bench/loader_backends.py
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
  for f in 1_tokenize 2_train 2b_accuracy 3_loader 3b_loader_petastorm 4_scaling 5_infer 6_end_to_end 7_tasks 8_fsdp 9_truncation 10_time_to_target; do
    [[ -f "$OUT/$f.md" ]] && { cat "$OUT/$f.md"; echo; } || echo -e "## $f\n\nNot produced in this run (see the script's log).\n"
  done
} > bench/RESULTS.md
echo "wrote bench/RESULTS.md"
