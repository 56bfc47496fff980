"""Multi-label classification: text -> any number of N labels (none is a valid answer), a sigmoid per label.

Spark reads a label column of lists (names or integer ids; an empty list is a row with no label), or one
string per row split at data.label_separator, and refuses single labels, labels outside data.label_names and
labels that never occur in training. Rows are staged with a multi-hot target; the head is transformers'
multi_label_classification (binary cross-entropy over the labels). A label is predicted where its probability
reaches its threshold: 0.5, or with train.tune_thresholds each label's F1-best threshold on the validation
split (then the reported figures are optimistic, chosen on the rows they are measured on; metrics.json says
so). Metrics: micro, macro and weighted precision/recall/F1, subset accuracy, Hamming loss, a report per
label, and each label's frequency in train and validation. The served model answers the labels over their
thresholds and every label's probability.
"""

from __future__ import annotations

import json
import os

import numpy as np

from spark_tuning.tasks.base import Staged
from spark_tuning.tasks.classification import PREDICTIONS, TextRowsTask, predict, stage_rows

THRESHOLDS_FILE = "thresholds.json"
METRICS = ("f1_micro", "f1_macro", "subset_accuracy", "hamming_loss")


def tune_thresholds(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per label, the threshold (of 0.05, 0.10, ..., 0.95) with the best F1 on these rows; 0.5 on a tie
    with it, and for a label these rows never hold."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    out = np.full(probs.shape[1], 0.5)
    for j in range(probs.shape[1]):
        t = truth[:, j] > 0.5
        if not t.any():
            continue
        f1 = [_f1(probs[:, j] >= g, t) for g in grid]
        best = max(f1)
        out[j] = 0.5 if _f1(probs[:, j] >= 0.5, t) >= best else float(grid[int(np.argmax(f1))])
    return out


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    return 2 * tp / max(1.0, float(pred.sum() + truth.sum()))


class MultiLabel(TextRowsTask):
    eval_metrics = ("eval_loss", "eval_f1_micro", "eval_f1_macro", "eval_subset_accuracy")
    name = "multilabel_classification"
    answer_columns = ("labels", "probabilities")
    logged_files = ("label_map.json", THRESHOLDS_FILE, "label_f1.png")

    def config_problems(self, cfg) -> list[str]:
        return super().config_problems(cfg) + self.petastorm_problems(cfg)

    def prepare_rows(self, spark, cfg):
        from spark_tuning.data import dataset

        return dataset.prepare_label_lists(spark, cfg.data, cfg.seed)  # (rows, rows per label and split)

    def stage(self, spark, cfg, src, info: dict, staging: str) -> Staged:
        from spark_tuning.data import dataset

        prepared, frequency = dataset.prepare_label_lists(spark, cfg.data, cfg.seed)
        train_ref, eval_ref, figures = stage_rows(spark, cfg, src, prepared.train, prepared.eval, staging)
        figures = {**figures, "labels": list(prepared.labels.names), **info}
        return Staged(train_ref, eval_ref, figures, {"label_frequency": frequency},
                      id2label=dict(prepared.labels.id2label), frames=[prepared.train, prepared.eval])

    def load_model(self, cfg, src, tokenizer, id2label: dict, device: str, dtype):
        from spark_tuning.model.sources import build_classifier

        return build_classifier(src, cfg.model, id2label, tokenizer.pad_token_id, device, dtype,
                                problem_type="multi_label_classification")

    def evaluate(self, model, shard, cfg, extras: dict, tokenizer, ctx, precision: str, step: int, tracker,
                 id2label: dict) -> tuple[dict, dict]:
        from spark_tuning.evaluate.metrics import multilabel_metrics
        from spark_tuning.loader.batches import plan_eval_batches
        from spark_tuning.train import distributed

        local = predict(model, shard, plan_eval_batches(shard, cfg.train.eval_batch_size), tokenizer.pad_token_id,
                        ctx.device, precision, head="sigmoid")
        parts = distributed.gather(local, ctx)
        row_ids = np.concatenate([p["row_ids"] for p in parts])
        probs = np.concatenate([p["probs"] for p in parts if len(p["probs"])])
        truth = np.concatenate([p["labels"] for p in parts if len(p["labels"])])
        thresholds = tune_thresholds(probs, truth) if cfg.train.tune_thresholds else np.full(probs.shape[1], 0.5)
        m = multilabel_metrics(probs >= thresholds, truth > 0.5, list(id2label.values()))
        rec = {"step": step, "eval_loss": sum(p["loss_sum"] for p in parts) / max(1, len(row_ids)),
               "eval_f1_micro": m["f1_micro"], "eval_f1_macro": m["f1_macro"],
               "eval_subset_accuracy": m["subset_accuracy"]}
        order = np.argsort(row_ids)
        return rec, {"row_ids": row_ids[order].tolist(), "probs": probs[order].round(6).tolist(),
                     "truth": truth[order].astype(int).tolist(), "thresholds": thresholds.tolist()}

    def metrics(self, result: dict, staged: Staged) -> dict:
        from spark_tuning.evaluate.metrics import multilabel_metrics

        ev, names = result["eval"], list(staged.id2label.values())
        probs, truth, thresholds = np.asarray(ev["probs"]), np.asarray(ev["truth"]) > 0, np.asarray(ev["thresholds"])
        m = multilabel_metrics(probs >= thresholds, truth, names)
        m.update(task_metrics="multilabel", eval_loss=result["epochs"][-1]["eval_loss"],
                 thresholds=dict(zip(names, thresholds.tolist())),
                 thresholds_from="validation split (tuned: these figures are optimistic)"
                 if not np.all(thresholds == 0.5) else "0.5 for every label",
                 label_frequency=staged.extras["label_frequency"])
        return m

    def write_outputs(self, folder: str, cfg, metrics: dict, result: dict, staged: Staged) -> None:
        import pandas as pd

        from spark_tuning.evaluate.metrics import plot_label_f1

        names = list(staged.id2label.values())
        with open(os.path.join(folder, "label_map.json"), "w") as f:
            json.dump({"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}, f, indent=2)
        with open(os.path.join(folder, THRESHOLDS_FILE), "w") as f:
            json.dump(metrics["thresholds"], f, indent=2)
        plot_label_f1(metrics["per_label"], os.path.join(folder, "label_f1.png"),
                      f"{cfg.resolved_run_name}: micro F1 {metrics['f1_micro']:.3f}")
        ev = result["eval"]
        probs, thresholds = np.asarray(ev["probs"]), np.asarray(ev["thresholds"])
        texts = self.eval_texts(staged)
        preds = pd.DataFrame({"row_id": ev["row_ids"],
                              "labels": [[n for n, t in zip(names, row) if t] for row in ev["truth"]],
                              "predicted": [[n for n, hit in zip(names, row >= thresholds) if hit] for row in probs],
                              "probabilities": ev["probs"]})
        texts.merge(preds, on="row_id").sort_values("row_id").to_parquet(os.path.join(folder, PREDICTIONS), index=False)

    def summary_rows(self, metrics: dict) -> list[tuple[str, str]]:
        m = metrics
        return [("F1 micro / macro / weighted", f"{m['f1_micro']:.4f} / {m['f1_macro']:.4f} / {m['f1_weighted']:.4f}"),
                ("precision / recall (micro)", f"{m['precision_micro']:.4f} / {m['recall_micro']:.4f}"),
                ("subset accuracy", f"{m['subset_accuracy']:.4f}"), ("Hamming loss", f"{m['hamming_loss']:.4f}"),
                ("thresholds", m["thresholds_from"]), ("validation rows", str(m["num_examples"]))]

    def serving_config(self, cfg, extras: dict, folder: str) -> dict:
        with open(os.path.join(folder, THRESHOLDS_FILE)) as f:
            return {"thresholds": json.load(f)}

    def output_columns(self, serving: dict) -> list[tuple[str, str]]:
        return [("labels", "string[]"), ("probabilities", "double[]")]

    def compare_served(self, served, held, atol: float):
        """Row by row: the same label set, probabilities equal to atol; a label that flips where the run's own
        probability was within atol of its threshold is a near tie. Metrics recomputed from the served labels."""
        from spark_tuning.evaluate.agreement import Agreement
        from spark_tuning.evaluate.metrics import multilabel_metrics

        rows, out, names = held.rows, Agreement(), held.names or []
        got = [set(x) for x in served["labels"]]
        if "labels" in rows.columns and names:
            truth = np.array([[n in set(r) for n in names] for r in rows["labels"]])
            hits = np.array([[n in g for n in names] for g in got])
            m = multilabel_metrics(hits, truth, names)
            out.metrics = {k: m[k] for k in METRICS}
        if held.offline_metrics:
            out.offline = {k: held.offline_metrics[k] for k in METRICS}
        if "predicted" not in rows.columns:
            return out
        thresholds = np.array([(held.offline_metrics or {}).get("thresholds", {}).get(n, 0.5) for n in names])
        offline_p = np.stack(rows["probabilities"].to_numpy())
        diff = np.abs(np.stack(served["probabilities"].to_numpy()) - offline_p).max(axis=1)
        same = np.array([g == set(p) for g, p in zip(got, rows["predicted"])])
        tie = ~same & (diff <= atol) & (np.abs(offline_p - thresholds).min(axis=1) <= atol)
        out.agreement, out.near_ties = float(same.mean()), int(tie.sum())
        out.max_probability_diff = float(diff.max()) if len(diff) else 0.0
        for i in np.flatnonzero((~same & ~tie) | (diff > atol)):
            out.differences.append({"row": int(i), "row_id": int(rows["row_id"].iloc[i]),
                                    "text": str(rows["text"].iloc[i])[:80],
                                    "offline_labels": sorted(rows["predicted"].iloc[i]),
                                    "served_labels": sorted(got[i]), "probability_diff": float(diff[i])})
        return out


TASK = MultiLabel()
