"""Regression: text -> a number (a rating, a score, a price), one linear output on the pretrained body.

Spark reads the text and a numeric label column and refuses lists, strings, nulls, NaN, infinities and a
constant target (with the row count and an example) before any training; the training targets are
standardized by default (data.standardize_target) with the training split's mean and standard deviation,
which are saved with the model (regression.json, and the served model's config) and undone at prediction.
Loss: MSE, or Huber (train.regression_loss). Evaluation: RMSE, MAE, R², Pearson and Spearman, in the
target's own units; a predicted-vs-true scatter plot; every validation row's prediction
(eval_predictions.parquet), which verify compares a served model with. The served model answers `prediction`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from spark_tuning.tasks.base import Staged
from spark_tuning.tasks.classification import PREDICTIONS, TextRowsTask, predict, stage_rows

SCALE_FILE = "regression.json"
# Served and offline predictions are compared in standardized units (the target's std): verify's
# probability tolerance then means the same in any unit.
METRICS = ("rmse", "mae", "r2", "pearson", "spearman")


class Regression(TextRowsTask):
    eval_metrics = ("eval_loss", "eval_rmse", "eval_mae", "eval_r2")
    name = "regression"
    answer_columns = ("prediction",)
    logged_files = (SCALE_FILE, "predicted_vs_true.png")

    def config_problems(self, cfg) -> list[str]:
        p = super().config_problems(cfg) + self.petastorm_problems(cfg)
        if cfg.data.label_names:
            p.append(f"data.label_names = {cfg.data.label_names!r} names classes, and task regression has none: remove it")
        return p

    def prepare_rows(self, spark, cfg):
        from pyspark.sql import functions as F

        from spark_tuning.data import dataset

        prepared, _ = dataset.prepare_targets(spark, cfg.data, cfg.seed)
        stats = {}
        for split, df in (("train", prepared.train), ("validation", prepared.eval)):
            row = df.agg(F.min("label"), F.mean("label"), F.stddev("label"), F.max("label")).first()
            stats[split] = dict(zip(("min", "mean", "std", "max"), (round(float(v or 0), 6) for v in row)))
        return prepared, stats

    def stage(self, spark, cfg, src, info: dict, staging: str) -> Staged:
        from pyspark.sql import functions as F

        from spark_tuning.data import dataset

        prepared, scale = dataset.prepare_targets(spark, cfg.data, cfg.seed)
        mean, std = (scale.mean, scale.std) if cfg.data.standardize_target else (0.0, 1.0)
        # The staged label is what the head learns: (target - mean) / std, as float (read as float32).
        scaled = [df.withColumn("label", ((F.col("label") - mean) / std).cast("float"))
                  for df in (prepared.train, prepared.eval)]
        train_ref, eval_ref, figures = stage_rows(spark, cfg, src, scaled[0], scaled[1], staging)
        figures = {**figures, "target_mean": scale.mean, "target_std": scale.std, **info}
        extras = {"target_mean": mean, "target_std": std, "standardized": cfg.data.standardize_target}
        return Staged(train_ref, eval_ref, figures, extras, id2label={0: "value"},
                      frames=[prepared.train, prepared.eval])

    def load_model(self, cfg, src, tokenizer, id2label: dict, device: str, dtype):
        from spark_tuning.model.sources import build_classifier

        return build_classifier(src, cfg.model, {0: "value"}, tokenizer.pad_token_id, device, dtype,
                                problem_type="regression")

    def loss(self, model, batch: dict, cfg):
        """MSE or Huber (train.regression_loss) of the single output against the (standardized) target,
        computed in fp32 whatever the autocast precision."""
        import torch.nn.functional as F

        target = batch["labels"].float()
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # ids, mask (and token types for pairs)
        value = model(**inputs).logits.float()[:, 0]
        if cfg.train.regression_loss == "huber":
            return F.huber_loss(value, target, delta=cfg.train.huber_delta)
        return F.mse_loss(value, target)

    def evaluate(self, model, shard, cfg, extras: dict, tokenizer, ctx, precision: str, step: int, tracker,
                 id2label: dict) -> tuple[dict, dict]:
        """Every rank predicts its share; every rank gets all rows, in the target's units."""
        from spark_tuning.evaluate.metrics import regression_metrics
        from spark_tuning.loader.batches import plan_eval_batches
        from spark_tuning.train import distributed

        local = predict(model, shard, plan_eval_batches(shard, cfg.train.eval_batch_size), tokenizer.pad_token_id,
                        ctx.device, precision, head="identity")
        parts = distributed.gather(local, ctx)
        row_ids = np.concatenate([p["row_ids"] for p in parts])
        mean, std = extras["target_mean"], extras["target_std"]
        values = np.concatenate([p["probs"][:, 0] for p in parts if len(p["probs"])]).astype(np.float64)
        targets = np.concatenate([p["labels"] for p in parts]).astype(np.float64)
        m = regression_metrics(values * std + mean, targets * std + mean)
        rec = {"step": step, "eval_loss": float(((values - targets) ** 2).mean()), "eval_rmse": m["rmse"],
               "eval_mae": m["mae"], "eval_r2": m["r2"]}
        order = np.argsort(row_ids)
        return rec, {"row_ids": row_ids[order].tolist(), "preds": (values[order] * std + mean).tolist(),
                     "labels": (targets[order] * std + mean).tolist()}

    def metrics(self, result: dict, staged: Staged) -> dict:
        from spark_tuning.evaluate.metrics import regression_metrics

        ev = result["eval"]
        m = regression_metrics(ev["preds"], ev["labels"])
        m.update(task_metrics="regression", eval_loss=result["epochs"][-1]["eval_loss"],
                 standardized=staged.extras["standardized"], train_target_mean=staged.figures["target_mean"],
                 train_target_std=staged.figures["target_std"])
        return m

    def write_outputs(self, folder: str, cfg, metrics: dict, result: dict, staged: Staged) -> None:
        import pandas as pd

        from spark_tuning.evaluate.metrics import plot_predicted_vs_true

        with open(os.path.join(folder, SCALE_FILE), "w") as f:
            json.dump({"target_mean": staged.extras["target_mean"], "target_std": staged.extras["target_std"],
                       "note": "the model's output x target_std + target_mean is the prediction"}, f, indent=2)
        ev = result["eval"]
        plot_predicted_vs_true(ev["preds"], ev["labels"], os.path.join(folder, "predicted_vs_true.png"),
                               f"{cfg.resolved_run_name}: RMSE {metrics['rmse']:.3g}, R² {metrics['r2']:.3f}")
        texts = self.eval_texts(staged)
        preds = pd.DataFrame({"row_id": ev["row_ids"], "label": ev["labels"], "prediction": ev["preds"]})
        texts.merge(preds, on="row_id").sort_values("row_id").to_parquet(os.path.join(folder, PREDICTIONS), index=False)

    def summary_rows(self, metrics: dict) -> list[tuple[str, str]]:
        m = metrics
        return [("RMSE", f"{m['rmse']:.4g}"), ("MAE", f"{m['mae']:.4g}"), ("R²", f"{m['r2']:.4f}"),
                ("Pearson / Spearman", f"{m['pearson']:.4f} / {m['spearman']:.4f}"),
                ("target mean / std (validation)", f"{m['target_mean']:.4g} / {m['target_std']:.4g}"),
                ("validation rows", str(m["rows"]))]

    def serving_config(self, cfg, extras: dict, folder: str) -> dict:
        return {"target_mean": float(extras["target_mean"]), "target_std": float(extras["target_std"])}

    def output_columns(self, serving: dict) -> list[tuple[str, str]]:
        return [("prediction", "double")]

    def compare_served(self, served, held, atol: float):
        """Row by row, served prediction = offline prediction to atol x the target's std (so the tolerance of
        the precisions means the same in any unit); the metrics recomputed from the served answers."""
        from spark_tuning.evaluate.agreement import Agreement
        from spark_tuning.evaluate.metrics import regression_metrics

        rows, out = held.rows, Agreement()
        got = served["prediction"].to_numpy(dtype=np.float64)
        scale = float((held.offline_metrics or {}).get("train_target_std") or 1.0)
        if "label" in rows.columns and rows["label"].notna().all():
            m = regression_metrics(got, rows["label"].to_numpy(dtype=np.float64))
            out.metrics = {k: m[k] for k in METRICS}
        if held.offline_metrics:
            out.offline = {k: held.offline_metrics[k] for k in METRICS}
        # Metrics of values equal to atol x std may differ by as much (R² and correlations by less).
        out.metric_tolerance = atol * scale
        if "prediction" not in rows.columns:
            return out
        diff = np.abs(got - rows["prediction"].to_numpy(dtype=np.float64))
        out.agreement = float((diff <= atol * scale).mean())
        out.max_probability_diff = float(diff.max() / scale) if len(diff) else 0.0
        for i in np.flatnonzero(diff > atol * scale):
            out.differences.append({"row": int(i), "row_id": int(rows["row_id"].iloc[i]) if "row_id" in rows else int(i),
                                    "text": str(rows["text"].iloc[i])[:80],
                                    "offline_prediction": float(rows["prediction"].iloc[i]),
                                    "served_prediction": float(got[i]), "difference": float(diff[i])})
        return out


TASK = Regression()
