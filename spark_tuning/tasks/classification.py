"""Sequence classification: text -> one of N labels, a new classification head on the pretrained body.

Spark reads and checks the text and label columns, splits, tokenizes and stages the rows; every rank
trains with the model's own cross-entropy loss and evaluates its share of the validation rows (softmax
probabilities); the job writes accuracy, precision, recall, F1, the confusion matrix and every validation
row's prediction (eval_predictions.parquet, which verify compares a served model with).
"""

from __future__ import annotations

import json
import os

import numpy as np

from spark_tuning.tasks.base import Profiled, Staged, Task

PREDICTIONS = "eval_predictions.parquet"


def predict(model, shard, plan, pad_id: int, device: str, precision: str, head: str = "softmax") -> dict[str, np.ndarray]:
    """Every row of `shard`, batched by `plan`: row ids, `probs` (`head` of the logits: softmax over classes,
    sigmoid per label, or identity: the raw outputs of a regression head), labels (class ids, multi-hot rows
    or targets) and the loss sum (the head's own loss)."""
    import torch

    to_probs = {"softmax": lambda x: torch.softmax(x, dim=-1), "sigmoid": torch.sigmoid, "identity": lambda x: x}[head]
    from spark_tuning.loader.batches import iterate
    from spark_tuning.train.feed import to_device
    from spark_tuning.train.precision import autocast

    model.eval()
    row_ids, probs, loss_sum = [], [], 0.0
    with torch.inference_mode(), autocast(precision, device):
        for index, batch in iterate(shard, plan, pad_id):
            out = model(**to_device(batch, device))
            loss_sum += float(out.loss) * len(index)
            probs.append(to_probs(out.logits.float()).cpu().numpy())
            row_ids.append(shard.row_ids[index])
    if not probs:
        return {"row_ids": np.zeros(0, np.int64), "probs": np.zeros((0, 0)), "labels": shard.labels[:0],
                "loss_sum": 0.0}
    labels = shard.labels[np.concatenate(plan)]
    return {"row_ids": np.concatenate(row_ids), "probs": np.concatenate(probs), "labels": labels,
            "loss_sum": loss_sum}


class TextRowsTask(Task):
    """What the tasks that read one text (or a pair of texts) and one label per row share (classification,
    regression, multilabel_classification): the column checks, the validation texts for the predictions
    file, and input examples from it."""

    reads_pairs = True
    chooses_truncation = True

    def prepare_rows(self, spark, cfg):
        """The task's rows before tokenizing (dataset.Prepared: `text` [, `text_pair`], `label`), and the
        labels' distribution per split for the profile."""
        raise NotImplementedError

    def profile_rows(self, spark, cfg, src, info: dict) -> Profiled:
        from spark_tuning.text.tokenize import token_lengths

        prepared, labels = self.prepare_rows(spark, cfg)
        texts = [c for c in ("text", "text_pair") if c in prepared.train.columns]
        train, evaluation = (token_lengths(df.select(*texts), src, cfg.model) for df in (prepared.train, prepared.eval))
        return Profiled(train, evaluation, dict(prepared.counts), labels, cfg.data.max_length,
                        frames=[prepared.train, prepared.eval])

    def config_problems(self, cfg) -> list[str]:
        d, p = cfg.data, []
        columns = [c for c in (d.text_column, d.label_column, d.text_pair_column) if c]
        if len(set(columns)) < len(columns):
            named = " and ".join(f"data.{k}_column" for k in ("text", "label", "text_pair")[:len(columns)])
            p.append(f"{named} name the same column ({columns}): they must differ")
        if d.text_pair_column and cfg.loader.kind == "petastorm":
            p.append("data.text_pair_column with loader.kind = 'petastorm': the petastorm loader stages no token "
                     "type ids; use loader.kind: parquet")
        return p

    def input_examples(self, cfg, folder: str) -> list:
        """Two synthetic texts (or {text, text_pair} records): never a row of the data, which the registered
        model would otherwise carry to everyone who can read the registry."""
        texts = ["a film worth seeing", "a dull, tedious film"]
        if cfg.data.text_pair_column:
            return [{"text": t, "text_pair": "another review of the same film"} for t in texts]
        return texts

    @staticmethod
    def eval_texts(staged: Staged):
        """The staged validation rows' row_id and text (and text_pair), for the predictions file."""
        import pyarrow.parquet as pq

        names = pq.read_schema(next(f for f in _parquet_files(staged.eval_ref.path))).names
        return pq.read_table(staged.eval_ref.path,
                             columns=[c for c in ("row_id", "text", "text_pair") if c in names]).to_pandas()


class Classification(TextRowsTask):
    eval_metrics = ("eval_loss", "eval_accuracy", "eval_f1")
    name = "classification"
    logged_files = ("label_map.json", "confusion_matrix.png")

    def prepare_rows(self, spark, cfg):
        from spark_tuning.data import dataset

        prepared = dataset.prepare(spark, cfg.data, cfg.seed)
        names = prepared.labels.names
        return prepared, {split: {names[k]: n for k, n in class_counts(df).items()}
                          for split, df in (("train", prepared.train), ("validation", prepared.eval))}

    def stage(self, spark, cfg, src, info: dict, staging: str) -> Staged:
        from spark_tuning.data import dataset

        prepared = dataset.prepare(spark, cfg.data, cfg.seed)
        train_ref, eval_ref, figures = stage_rows(spark, cfg, src, prepared.train, prepared.eval, staging)
        return Staged(train_ref, eval_ref, {**figures, "classes": list(prepared.labels.names), **info},
                      id2label=dict(prepared.labels.id2label), frames=[prepared.train, prepared.eval])

    def load_model(self, cfg, src, tokenizer, id2label: dict, device: str, dtype):
        from spark_tuning.model.sources import build_classifier

        return build_classifier(src, cfg.model, id2label, tokenizer.pad_token_id, device, dtype)

    def evaluate(self, model, shard, cfg, extras: dict, tokenizer, ctx, precision: str, step: int, tracker,
                 id2label: dict) -> tuple[dict, dict]:
        """Every rank predicts its share of the validation rows; every rank gets the whole picture."""
        from spark_tuning.evaluate.metrics import classification_metrics
        from spark_tuning.loader.batches import plan_eval_batches
        from spark_tuning.train import distributed

        local = predict(model, shard, plan_eval_batches(shard, cfg.train.eval_batch_size), tokenizer.pad_token_id,
                        ctx.device, precision)
        parts = distributed.gather(local, ctx)
        row_ids = np.concatenate([p["row_ids"] for p in parts])
        probs = np.concatenate([p["probs"] for p in parts if len(p["probs"])])
        labels = np.concatenate([p["labels"] for p in parts])
        preds = probs.argmax(axis=1)
        m = classification_metrics(preds, labels, list(id2label.values()))
        rec = {"step": step, "eval_loss": sum(p["loss_sum"] for p in parts) / max(1, len(labels)),
               "eval_accuracy": m["accuracy"], "eval_f1": m["f1"]}
        order = np.argsort(row_ids)
        return rec, {"row_ids": row_ids[order].tolist(), "preds": preds[order].tolist(),
                     "labels": labels[order].tolist(), "probs": probs[order].round(6).tolist()}

    def metrics(self, result: dict, staged: Staged) -> dict:
        from spark_tuning.evaluate.metrics import classification_metrics

        ev = result["eval"]
        m = classification_metrics(ev["preds"], ev["labels"], list(staged.id2label.values()))
        m.update(eval_loss=result["epochs"][-1]["eval_loss"], train_data_wait_share=result["data_wait_share"])
        return m

    def write_outputs(self, folder: str, cfg, metrics: dict, result: dict, staged: Staged) -> None:
        import pandas as pd

        from spark_tuning.evaluate.metrics import plot_confusion_matrix

        names = list(staged.id2label.values())
        with open(os.path.join(folder, "label_map.json"), "w") as f:
            json.dump({"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}, f, indent=2)
        plot_confusion_matrix(metrics["confusion_matrix"], names, os.path.join(folder, "confusion_matrix.png"),
                              f"{cfg.resolved_run_name}: accuracy {metrics['accuracy']:.3f}")
        # Validation rows with their predictions: for error analysis, and for checking a served model later.
        texts = self.eval_texts(staged)
        ev = result["eval"]
        preds = pd.DataFrame({"row_id": ev["row_ids"], "label": ev["labels"], "prediction": ev["preds"],
                              "probability": [max(p) for p in ev["probs"]], "probabilities": ev["probs"]})
        texts.merge(preds, on="row_id").sort_values("row_id").to_parquet(os.path.join(folder, PREDICTIONS), index=False)

    def summary_rows(self, metrics: dict) -> list[tuple[str, str]]:
        m = metrics
        return [("accuracy", f"{m['accuracy']:.4f}"), (f"precision ({m['average']})", f"{m['precision']:.4f}"),
                (f"recall ({m['average']})", f"{m['recall']:.4f}"), (f"f1 ({m['average']})", f"{m['f1']:.4f}"),
                ("eval loss", f"{m['eval_loss']:.4f}"), ("validation rows", str(m["num_examples"]))]


def stage_rows(spark, cfg, src, train_df, eval_df, staging: str):
    """`text` + `label` rows (any label type) -> tokenized and staged train and eval splits, and their
    figures: the data stage of every task that reads one text and one label per row."""
    from spark_tuning.loader.backends import stage_as
    from spark_tuning.text.tokenize import tokenize

    n_files, kind, max_len = 2 * cfg.distributed.num_processes, cfg.loader.kind, cfg.data.max_length
    cut = {"truncation": cfg.data.truncation, "head_tokens": cfg.data.head_tokens}
    train_ref = stage_as(kind, tokenize(train_df, src, cfg.model, max_len, **cut).drop("text", "text_pair"),
                         os.path.join(staging, "train"), n_files, max_len)
    eval_ref = stage_as(kind, tokenize(eval_df, src, cfg.model, max_len, **cut), os.path.join(staging, "eval"),
                        n_files, max_len)
    stats = length_stats(spark, train_ref.path, max_len)
    return train_ref, eval_ref, {"train_rows": train_ref.num_rows, "mean_tokens_per_row": round(stats["mean_length"], 1),
                                 "eval_rows": eval_ref.num_rows, "truncated_share": stats["truncated_share"]}


def class_counts(df) -> dict[int, int]:
    """Rows per class id of a `label` column, in id order."""
    return dict(sorted((int(r["label"]), int(r["count"])) for r in df.groupBy("label").count().collect()))


def _parquet_files(path: str) -> list[str]:
    import glob

    return sorted(glob.glob(os.path.join(path, "*.parquet")))


def length_stats(spark, path: str, max_length: int) -> dict[str, float]:
    from pyspark.sql import functions as F

    row = spark.read.parquet(path).agg(
        F.avg("length").alias("mean"), F.avg((F.col("length") >= max_length).cast("double")).alias("trunc")
    ).first()
    return {"mean_length": float(row["mean"] or 0), "truncated_share": round(float(row["trunc"] or 0), 4)}


TASK = Classification()
