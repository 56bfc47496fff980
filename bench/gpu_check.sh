#!/usr/bin/env bash
# bench/gpu_check.sh [--steps N] [--batch-size B] [--max-length L] [--keep]
#
# The GPU check, on one GPU machine, in under 5 minutes: a short fine-tune of a GPT-2-size classifier
# (124M parameters, built from GPT2Config with a tokenizer trained here: no downloads) through the whole
# job (Spark data stage, TorchDistributor in local mode, use_gpu: true -> NCCL/cuda, bf16 autocast).
# Prints tokens per second, model FLOPs utilisation (6 x parameters x tokens/s over the card's dense bf16
# peak; set GPU_PEAK_TFLOPS for a card bench/gpu_check.py does not know) and peak GPU memory.
#
# Needs: this repository, a Python with a CUDA build of torch (PYTHON, default python3), and Java 17+
# for Spark (java on PATH, or JAVA_HOME). The other packages (pyspark, transformers, tokenizers, mlflow,
# pyarrow, pandas, scikit-learn, matplotlib, PyYAML) are used where that Python has them; missing ones are
# installed with pip at the versions in conf/env/constraints.txt (torch is never touched), which needs a
# package index (PyPI or a mirror: PIP_INDEX_URL). Exits 2 when the machine lacks something, naming it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
say() { echo "gpu_check: $*" >&2; }

command -v "$PY" >/dev/null || { say "no Python at '$PY': set PYTHON to an interpreter with CUDA torch"; exit 2; }
"$PY" - <<'EOF' || { say "torch cannot see a CUDA GPU with this Python ($PY): set PYTHON, check nvidia-smi"; exit 2; }
import sys, torch
ok = torch.cuda.is_available()
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0) if ok else 'none'}", file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then java="$JAVA_HOME/bin/java"; else java="$(command -v java || true)"; fi
[[ -n "$java" ]] || { say "Spark needs Java 17+: install a JRE (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME"; exit 2; }

# Install only what is missing, at the tested versions; keep the machine's CUDA torch.
missing="$("$PY" - <<'EOF'
import importlib.util
need = {"pyspark": "pyspark", "transformers": "transformers", "tokenizers": "tokenizers", "mlflow": "mlflow",
        "pyarrow": "pyarrow", "pandas": "pandas", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
        "yaml": "PyYAML", "safetensors": "safetensors", "numpy": "numpy"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)"
if [[ -n "$missing" ]]; then
  say "installing $missing"
  constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
  grep -v '^torch' "$root/conf/env/constraints.txt" > "$constraints"
  "$PY" -m pip install --disable-pip-version-check -q -c "$constraints" $missing \
    || { say "could not install $missing (no package index reachable?): install them into $PY first"; exit 2; }
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYSPARK_PYTHON="$PY" PYSPARK_DRIVER_PYTHON="$PY" SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# The whole check stays under 5 minutes: stop it at 290 s rather than let it run on.
exec timeout --signal=TERM --kill-after=10 290 "$PY" "$root/bench/gpu_check.py" "$@"
