"""Benchmarks 4 and 6: the whole job. End-to-end wall time of the quickstart split into its stages, and
data-parallel scaling (1 vs 2 processes through TorchDistributor) on the same job.

    PYTHONPATH=. /work/main/.venv/bin/python bench/bench_job.py [--quick]

Runs `finetune.run` on conf/quickstart.yaml (240 short reviews, all-MiniLM-L6-v2, local[*]), outputs and
the MLflow store in a temporary folder. The first run starts Spark itself (its start-up is part of the
quickstart's wall time); the scaling runs reuse that session and alternate 1 and 2 processes. Threads per
process come from spark_tuning.train.distributed.threads_per_process (cores / processes on one machine).
--quick: one epoch and no MLflow model packaging; full: the quickstart as shipped (4 epochs, model logged).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import _common as C


def config(tmp: str, name: str, **sets):
    from spark_tuning.config import load_config

    sets = {"output_dir": os.path.join(tmp, name, "model"), **sets}
    return load_config(os.path.join(C.ROOT, "conf", "quickstart.yaml"), [f"{k}={v}" for k, v in sets.items()])


def main() -> None:
    args = C.mode_args(__doc__.splitlines()[0])
    from spark_tuning import finetune

    tmp = tempfile.mkdtemp(prefix="bench-job-")
    quick = {"train.epochs": 1, "tracking.log_model": False} if args.quick else {}
    scaling = {"train.epochs": 1 if args.quick else 2, "tracking.log_model": False}
    records = []
    spark = None
    try:
        runs = [("quickstart", 2, quick), ("scale", 1, scaling), ("scale", 2, scaling)]
        if not args.quick:
            runs += [("scale", 1, scaling)]  # 1, 2, 1: each alternative on both sides of the other
        for i, (what, procs, sets) in enumerate(runs):
            cfg = config(tmp, f"run{i}", **{"distributed.num_processes": procs, **sets})
            with C.measured({"what": what, "processes": procs}) as rec:
                s = finetune.run(cfg, spark=spark)
            if spark is None:
                from pyspark.sql import SparkSession

                spark = SparkSession.getActiveSession()
            rec.update({f"t_{k}": v for k, v in s.timings.items()}, steps=s.result["steps"],
                       tokens_per_s=s.result["tokens_per_second"], train_s=s.result["train_seconds"],
                       data_wait_share=s.result["data_wait_share"], accuracy=s.metrics["accuracy"])
            records.append(rec)
            print({k: v for k, v in rec.items()}, flush=True)
    finally:
        if spark is not None:
            spark.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    e2e = records[0]
    stages = [k for k in ("spark_start", "data", "training", "evaluation", "logging", "verify") if f"t_{k}" in e2e]
    e2e_rows = [{"stage": k, "share": f"{e2e[f't_{k}'] / e2e['t_total']:.0%}", "seconds": e2e[f"t_{k}"]} for k in stages]
    e2e_rows.append({"stage": "total", "share": "100%", "seconds": e2e["t_total"]})
    slowest = max(stages, key=lambda k: e2e[f"t_{k}"])
    fixed = e2e["t_total"] - e2e["t_training"]
    body6 = (f"Quickstart wall time **{e2e['t_total']:.0f} s**, of which training {e2e['t_training']:.0f} s "
             f"({e2e['t_training'] / e2e['t_total']:.0%}); everything else (fixed overhead) {fixed:.0f} s. Slowest "
             f"stage: **{slowest}**. {'One epoch, no model packaging (--quick).' if args.quick else 'As shipped.'} "
             f"Training ran {e2e['steps']} steps at {e2e['tokens_per_s']:.0f} tokens/s (2 processes); accuracy "
             f"{e2e['accuracy']:.2f}. Training includes starting the processes through TorchDistributor and "
             "loading the model in each.\n\n" + C.table(e2e_rows, ["stage", "share", "seconds"]))
    C.write_section("6_end_to_end", "6. End to end (quickstart)", body6, records[:1])

    scale = records[1:]
    best = {p: max(r["tokens_per_s"] for r in scale if r["processes"] == p) for p in (1, 2)}
    rows = [{"processes": r["processes"], "x 1 process": r["tokens_per_s"] / best[1], "tokens/s (loop)": r["tokens_per_s"],
             "training stage s": r["t_training"], "loop s": r["train_s"], "steps": r["steps"],
             "data wait": f"{r['data_wait_share']:.2%}", "load avg": r["load_before"],
             "busy others": f"{r['cpu_busy_others']:.0%}"} for r in scale]
    body4 = (f"2 processes run the training loop at **{best[2] / best[1]:.2f}x** the tokens/s of 1 process "
             f"(best of each; global batch doubles with 2 processes, so the step counts differ). "
             f"Quickstart job, {scaling['train.epochs']} epoch(s), {os.cpu_count()} cores, threads per process = "
             "cores / processes. `loop s` is the training loop alone; `training stage s` adds process start-up, "
             "model loading and validation.\n\n"
             + C.table(rows, ["processes", "x 1 process", "tokens/s (loop)", "training stage s", "loop s", "steps",
                              "data wait", "load avg", "busy others"]))
    C.write_section("4_scaling", "4. Data-parallel scaling (TorchDistributor)", body4, scale)


if __name__ == "__main__":
    main()
