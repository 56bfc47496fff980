"""Benchmark 7, the tasks side by side with a plain Hugging Face Trainer: the metric after a short CPU run and the
training throughput, on the same model, rows and optimiser settings.

    PYTHONPATH=. /work/main/.venv/bin/python bench/bench_tasks.py [--quick] [--tasks a,b]

About 20 minutes on 2 cores, so bench/run.sh runs it only with --tasks; its section (and records) are kept in
bench/tasks.md (.json), which run.sh copies into RESULTS.md otherwise.

For each task (classification on IMDB sentiment; regression, multilabel_classification, token_classification and
classification of text pairs on the `make-example` data built from the same reviews), the same training and
validation rows (written once as Parquet), all-MiniLM-L6-v2, max_length 128 (pairs: 256), 2 epochs of batches of 16, AdamW at
the task's learning rate with 10% warm-up and weight decay 0.01, the same seed, one process each:
  - spark-tuning: the whole job (`finetune.run`: Spark read, checks, tokenizer UDF, staging, TorchDistributor with
    one process, evaluation), precision auto;
  - HF Trainer: the usual recipe of each task (AutoTokenizer with truncation, DataCollatorWithPadding or
    DataCollatorForTokenClassification, AutoModelFor..., Trainer with bf16 where spark-tuning ran bf16), scored by
    spark-tuning's own metric functions on its predictions. For token classification that recipe truncates each
    row at max_length (words past it count as predicted O); spark-tuning windows them.
Throughput: useful (non-pad) training tokens per second of the training loop itself; wall: the whole job
against the Trainer's tokenize + train + predict (the job also starts Spark and a training process).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

import _common as C

MAX_LENGTH, BATCH, EPOCHS, SEED = 128, 16, 2, 0
# task key -> (task, example (None: IMDB itself), config settings, learning rate, metric key, metric name)
TASKS = {
    "classification": ("classification", None, {}, 5e-5, "accuracy", "accuracy"),
    "regression": ("regression", "imdb_scores", {"data.label_column": "score"}, 2e-4, "rmse", "RMSE"),
    "multilabel": ("multilabel_classification", "imdb_tags", {"data.label_column": "tags"}, 2e-4, "f1_micro",
                   "micro F1"),
    "ner": ("token_classification", "imdb_entities",
            {"data.text_column": "words", "data.label_column": "tags", "data.stride": 32}, 1e-4, "f1", "entity F1"),
    "pairs": ("classification", "imdb_pairs", {"data.text_pair_column": "text_pair", "data.max_length": 256}, 1e-4,
              "accuracy", "accuracy"),
}


def make_rows(tmp: str, example, n_train: int, n_eval: int):
    """Training and validation Parquet files of one task's rows; returns their paths and the frames."""
    import pandas as pd

    from spark_tuning.data import examples

    if example is None:
        rows = C.imdb_rows(n_train + n_eval, SEED)[["text", "label"]]
        rows["label"] = rows["label"].map({0: "negative", 1: "positive"})
    else:
        path = examples.write_example(example, C.IMDB, os.path.join(tmp, f"{example}.parquet"), n_train + n_eval, SEED)
        rows = pd.read_parquet(path)
    train, held = rows.iloc[:n_train].reset_index(drop=True), rows.iloc[n_train:].reset_index(drop=True)
    paths = os.path.join(tmp, "train.parquet"), os.path.join(tmp, "eval.parquet")
    train.to_parquet(paths[0], index=False)
    held.to_parquet(paths[1], index=False)
    return paths, train, held


def run_ours(spark, tmp: str, task: str, paths, settings: dict, lr: float) -> dict:
    from spark_tuning import finetune
    from spark_tuning.config import load_config

    sets = {"task": task, "output_dir": os.path.join(tmp, "ours"), "data.source": paths[0], "data.eval_source": paths[1],
            "model.source": C.minilm_dir(), "model.attention_dropout": 0.0, "seed": SEED,
            "data.max_length": MAX_LENGTH, "train.epochs": EPOCHS, "train.batch_size": BATCH, "train.learning_rate": lr,
            "train.warmup_ratio": 0.1, "train.weight_decay": 0.01, "train.log_every_steps": 1000,
            "distributed.num_processes": 1, "tracking.tracking_uri": f"sqlite:///{tmp}/mlflow.db",
            "tracking.log_model": False, "checkpoint.enabled": False, **settings}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    t = time.perf_counter()
    s = finetune.run(cfg, spark=spark)
    return {"wall_s": time.perf_counter() - t, "tokens_per_s": s.metrics["train_tokens_per_second"],
            "precision": s.metrics["train_precision"], "metrics": s.metrics}


def _count_tokens(collator, seen: dict):
    def collate(features):
        out = collator(features)
        seen["useful"] += int(out["attention_mask"].sum())
        return out
    return collate


def run_trainer(tmp: str, key: str, train, held, settings: dict, lr: float, bf16: bool) -> dict:
    """The usual Trainer recipe of the task; the metric by spark-tuning's own functions."""
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer, TrainingArguments)

    from spark_tuning.evaluate import metrics as M
    from spark_tuning.text.token_spans import tag_names

    disable_progress_bars()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(C.minilm_dir())
    label_col = settings.get("data.label_column", "label")
    max_length = int(settings.get("data.max_length", MAX_LENGTH))
    pair = settings.get("data.text_pair_column")
    extra = {}
    if key == "ner":
        types = sorted({t[2:] for tags in train["tags"] for t in tags if t != "O"})
        names = tag_names(types)
        index = {n: i for i, n in enumerate(names)}

        def encode(rows):
            enc = tok(rows["words"], is_split_into_words=True, truncation=True, max_length=max_length)
            enc["labels"] = []
            for i, tags in enumerate(rows["tags"]):
                words, prev, labels = enc.word_ids(i), None, []
                for w in words:
                    labels.append(-100 if w is None or w == prev else index[tags[w]])
                    prev = w
                enc["labels"].append(labels)
            return enc
        columns = ["words", "tags"]
        make = lambda: AutoModelForTokenClassification.from_pretrained(  # noqa: E731
            C.minilm_dir(), num_labels=len(names), id2label=dict(enumerate(names)))
        collator = DataCollatorForTokenClassification(tok)
    else:
        texts = ["text"] + ([pair] if pair else [])
        if key == "regression":
            mean, std = float(train[label_col].mean()), float(train[label_col].std(ddof=0))
            to_label = lambda v: (float(v) - mean) / std  # noqa: E731
            extra = {"num_labels": 1, "problem_type": "regression"}
        elif key == "multilabel":
            names = sorted({t for tags in train[label_col] for t in tags})
            to_label = lambda v: [float(n in set(v)) for n in names]  # noqa: E731
            extra = {"num_labels": len(names), "problem_type": "multi_label_classification"}
        else:
            names = sorted(set(train[label_col]))
            to_label = names.index
            extra = {"num_labels": len(names)}

        def encode(rows):
            enc = tok(*[rows[c] for c in texts], truncation=True, max_length=max_length)
            enc["labels"] = [to_label(v) for v in rows[label_col]]
            return enc
        columns = texts + [label_col]
        make = lambda: AutoModelForSequenceClassification.from_pretrained(C.minilm_dir(), **extra)  # noqa: E731
        collator = DataCollatorWithPadding(tok)
    ds_train = Dataset.from_pandas(train[columns]).map(encode, batched=True, remove_columns=columns)
    ds_eval = Dataset.from_pandas(held[columns]).map(encode, batched=True, remove_columns=columns)
    torch.manual_seed(SEED)
    model = make()
    model.config.attention_probs_dropout_prob = 0.0
    seen = {"useful": 0}
    args = TrainingArguments(output_dir=os.path.join(tmp, "trainer"), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=32, num_train_epochs=EPOCHS, learning_rate=lr, warmup_steps=0.1,
                             weight_decay=0.01, bf16=bf16, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=SEED)
    trainer = Trainer(model=model, args=args, train_dataset=ds_train, data_collator=_count_tokens(collator, seen))
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    trainer.data_collator = collator
    out = trainer.predict(ds_eval)
    logits, labels = out.predictions, out.label_ids
    if key == "ner":
        gold, pred = [], []
        for i, tags in enumerate(held["tags"]):
            keep = labels[i] != -100
            tagged = [names[int(t)] for t in logits[i][keep].argmax(-1)]
            gold.append(list(tags))
            pred.append(tagged + ["O"] * (len(tags) - len(tagged)))  # words past the cut: never found
        metric = M.entity_metrics(gold, pred)
    elif key == "regression":
        metric = M.regression_metrics(logits[:, 0] * std + mean, held[label_col].to_numpy(dtype=float))
    elif key == "multilabel":
        metric = M.multilabel_metrics(1 / (1 + np.exp(-logits)) >= 0.5, labels > 0.5, names)
    else:
        metric = M.classification_metrics(logits.argmax(-1), labels, names)
    return {"wall_s": time.perf_counter() - t0, "tokens_per_s": seen["useful"] / train_s,
            "precision": "bf16" if bf16 else "fp32", "metrics": metric}


def main() -> None:
    from spark_tuning.cluster.spark import get_spark
    from spark_tuning.config import SparkConfig

    args = C.mode_args(__doc__, lambda ap: ap.add_argument("--tasks", default=",".join(TASKS)))
    n_train, n_eval = (256, 128) if args.quick else (1024, 256)
    spark = get_spark(SparkConfig(master="local[2]", app_name="bench-tasks"))
    records = []
    for key in args.tasks.split(","):
        task, example, settings, lr, metric, metric_name = TASKS[key]
        with tempfile.TemporaryDirectory(prefix=f"bench-tasks-{key}-") as tmp:
            paths, train, held = make_rows(tmp, example, n_train, n_eval)
            with C.measured({}) as ours_load:
                ours = run_ours(spark, tmp, task, paths, settings, lr)
            theirs = run_trainer(tmp, key, train, held, settings, lr, ours["precision"] == "bf16")
        records.append({
            "task": key, "metric": metric_name, "spark-tuning": ours["metrics"][metric], "HF Trainer": theirs["metrics"][metric],
            "tokens/s ratio (ours / Trainer)": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "ours tokens/s": ours["tokens_per_s"], "Trainer tokens/s": theirs["tokens_per_s"],
            "wall ratio (ours / Trainer)": ours["wall_s"] / theirs["wall_s"], "ours wall s": ours["wall_s"],
            "Trainer wall s": theirs["wall_s"], "precision": ours["precision"],
            **{k: v for k, v in ours_load.items() if k.startswith(("load", "cpu"))}})
        print(records[-1], flush=True)
    columns = ["task", "metric", "spark-tuning", "HF Trainer", "tokens/s ratio (ours / Trainer)", "ours tokens/s",
               "Trainer tokens/s", "wall ratio (ours / Trainer)", "ours wall s", "Trainer wall s", "precision"]
    body = (f"{n_train} training and {n_eval} validation rows per task, all-MiniLM-L6-v2, max_length {MAX_LENGTH} (pairs: 256), "
            f"{EPOCHS} epochs of batches of {BATCH}, one process each, on {os.cpu_count()} CPUs "
            f"({'avx512_bf16' if _has_bf16() else 'AVX2 only'}).\n\n" + C.table(records, columns))
    C.write_section("7_tasks", "7. Tasks against a plain HF Trainer", body, records)
    import shutil  # kept beside the script: run.sh uses it when it does not rerun this (about 20 minutes)

    for ext in ("md", "json"):
        shutil.copy(os.path.join(C.OUT, f"7_tasks.{ext}"), os.path.join(C.HERE, f"tasks.{ext}"))


def _has_bf16() -> bool:
    with open("/proc/cpuinfo") as f:
        return "avx512_bf16" in f.read()


if __name__ == "__main__":
    main()
