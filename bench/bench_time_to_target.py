"""Benchmark 10, time to a target accuracy: the whole spark-tuning job against a tuned HF Trainer script.

    PYTHONPATH=. .venv/bin/python bench/bench_time_to_target.py [--quick]     # bench/run.sh --time-to-target

The same IMDB training reviews and the same held-out reviews, all-MiniLM-L6-v2, max_length 256, AdamW lr 5e-5
with linear decay, no warm-up, no weight decay, the same global batch (16 rows), one epoch, a validation
accuracy every 20 optimizer steps. Each clock starts before any work (spark-tuning: a new Spark session, the
data stage, staging, TorchDistributor's 2 processes as conf/imdb_minilm.yaml ships them, evaluations on
both; the script: reading the Parquet files, tokenizing with `datasets`, loading the model, the Trainer on 1
process with every core) and stops at the first evaluation at or above each target. Evaluations cost both
sides their time. The tuned script is bench/_recipes.py's careful hand-written recipe: dynamic padding,
the length-grouped sampler, attention dropout 0.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np

import _common as C

TARGETS = (0.70, 0.75, 0.80)
MAX_LENGTH, BATCH, LR, EVERY, SEED = 256, 16, 5e-5, 20, 0


def run_job(tmp: str, train: str, held: str) -> dict:
    """spark-tuning end to end (finetune.run), timed from before its Spark session starts; evaluation times
    from the MLflow metric history (the driver's relay logs each within half a second)."""
    from mlflow import MlflowClient

    from spark_tuning import finetune
    from spark_tuning.config import load_config

    sets = {"output_dir": os.path.join(tmp, "job", "model"), "data.source": train, "data.eval_source": held,
            "data.train_limit": "null", "data.eval_limit": "null", "data.max_length": MAX_LENGTH, "seed": SEED,
            "train.epochs": 1, "train.batch_size": BATCH // 2, "train.learning_rate": LR, "train.warmup_ratio": 0.0,
            "train.weight_decay": 0.0, "train.eval_every_steps": EVERY, "train.log_every_steps": 1000,
            "train.precision": "fp32", "tracking.experiment": "bench-time-to-target", "tracking.log_model": False,
            "spark.master": "local[2]"}
    cfg = load_config(os.path.join(C.ROOT, "conf", "imdb_minilm.yaml"), [f"{k}={v}" for k, v in sets.items()])
    t0 = time.time()
    summary = finetune.run(cfg)
    total = time.time() - t0
    client = MlflowClient(summary.tracking_uri)
    history = sorted(client.get_metric_history(summary.run_id, "eval_accuracy"), key=lambda m: m.timestamp)
    evals = [{"seconds": m.timestamp / 1000 - t0, "step": m.step, "accuracy": m.value} for m in history]
    return {"evals": evals, "total_s": total, "steps": summary.result["steps"], "timings": summary.timings,
            "final_accuracy": summary.metrics["accuracy"], "processes": cfg.distributed.num_processes}


def run_script(tmp: str, train: str, held: str) -> dict:
    """The tuned Trainer recipe as a user writes it, timed from reading the files."""
    import pandas as pd
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainerCallback, TrainingArguments)

    from spark_tuning.model.sources import ATTENTION_DROPOUT_KEYS

    disable_progress_bars()
    t0, evals = time.time(), []
    model_dir = C.minilm_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def dataset(path):
        ds = Dataset.from_pandas(pd.read_parquet(path)[["text", "label"]])
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=MAX_LENGTH), batched=True,
                      remove_columns=["text"])

    train_ds, held_ds = dataset(train), dataset(held)
    torch.manual_seed(SEED)
    config = AutoConfig.from_pretrained(model_dir, num_labels=2)
    for key in ATTENTION_DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, 0.0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)

    class Clock(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            evals.append({"seconds": time.time() - t0, "step": state.global_step, "accuracy": metrics["eval_accuracy"]})

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

    args = TrainingArguments(output_dir=os.path.join(tmp, "script"), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=64, num_train_epochs=1, learning_rate=LR, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=SEED, eval_strategy="steps", eval_steps=EVERY,
                             train_sampling_strategy="group_by_length")
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=held_ds,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy, callbacks=[Clock()])
    state = trainer.train()
    final = trainer.evaluate()
    return {"evals": evals, "total_s": time.time() - t0, "steps": state.global_step,
            "final_accuracy": final["eval_accuracy"], "processes": 1}


def time_to(evals: list[dict], target: float):
    hit = next((e for e in evals if e["accuracy"] >= target), None)
    return (hit["seconds"], hit["step"]) if hit else (None, None)


def main() -> None:
    args = C.mode_args(__doc__.splitlines()[0])
    n_train, n_held = (320, 128) if args.quick else (2000, 500)
    tmp = tempfile.mkdtemp(prefix="bench-ttt-")
    rows = C.imdb_rows(n_train + n_held, seed=5)
    train, held = os.path.join(tmp, "train.parquet"), os.path.join(tmp, "held.parquet")
    rows.iloc[:n_train].to_parquet(train)
    rows.iloc[n_train:].to_parquet(held)
    records = []
    try:
        for what in ("job", "script"):
            with C.measured({"what": what}) as rec:
                rec.update(run_job(tmp, train, held) if what == "job" else run_script(tmp, train, held))
            records.append(rec)
            print(json.dumps(rec, default=str), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    job, script = records
    table, verdicts = [], []
    for target in TARGETS:
        (js, jstep), (ss, sstep) = time_to(job["evals"], target), time_to(script["evals"], target)
        table.append({"target accuracy": f"{target:.2f}", "x script (time)": ss / js if js and ss else "",
                      "spark-tuning job s": js or "not reached", "at step": jstep or "",
                      "tuned HF script s": ss or "not reached", "at step ": sstep or ""})
        if js and ss:
            verdicts.append(f"{target:.2f}: the job in {js:.0f} s, the script in {ss:.0f} s (**{ss / js:.2f}x**)")
    body = ("Time to a validation accuracy, the whole job against a tuned HF Trainer script (the job's time "
            "includes its Spark session, data stage and staging). " + "; ".join(verdicts) + ".\n\n"
            f"{n_train} IMDB training reviews seen once, {n_held} held out, all-MiniLM-L6-v2, max_length "
            f"{MAX_LENGTH}, global batch {BATCH} (the job: {job['processes']} processes x {BATCH // 2}; the script: "
            f"1 process x {BATCH}), lr {LR} linear decay, no warm-up or weight decay, fp32, evaluation every "
            f"{EVERY} steps on the held-out rows. `x script` > 1: the job got there sooner.\n\n"
            + C.table(table, list(table[0]))
            + f"\nWhole runs: the job {job['total_s']:.0f} s ({job['steps']} steps, final accuracy "
            f"{job['final_accuracy']:.3f}; " + ", ".join(f"{k} {v:.0f} s" for k, v in job["timings"].items())
            + f"), the script {script['total_s']:.0f} s ({script['steps']} steps, final accuracy "
            f"{script['final_accuracy']:.3f}).\n\nEvaluations (seconds from the start, step, accuracy):\n\n"
            + "\n".join(f"- {r['what']}: " + ", ".join(f"{e['seconds']:.0f} s/{e['step']}/{e['accuracy']:.3f}"
                                                       for e in r["evals"]) for r in records))
    C.write_section("10_time_to_target", "10. Time to a target accuracy: the job vs a tuned HF Trainer script",
                    body, records)
    if not args.quick:  # kept for run.sh runs without --time-to-target
        shutil.copy(os.path.join(C.OUT, "10_time_to_target.md"), os.path.join(C.HERE, "time_to_target.md"))


if __name__ == "__main__":
    main()
