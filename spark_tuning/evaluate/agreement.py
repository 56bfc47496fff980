"""Served answers against the run's own, row by row: what `deploy.verify` reports, for the tasks that answer
labels (classification, and sft on labelled rows). A task that answers something else brings its own
comparison (`Task.compare_served`); verify only sends the rows, times them and renders the report.

The same inputs must give the same label; probabilities must agree to `atol`. A label that flips where
the run's own top two probabilities were within the tolerance of each other is a near tie that
precision explains: counted, not a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

LABEL_METRICS = ("accuracy", "precision", "recall", "f1")


@dataclass
class Agreement:
    agreement: Optional[float] = None  # share of rows whose served answer equals the offline one
    max_probability_diff: Optional[float] = None
    metrics: dict = field(default_factory=dict)  # the served answers' metrics (when labels are known)
    offline: dict = field(default_factory=dict)  # the same metrics, from the run
    differences: list[dict] = field(default_factory=list)  # the rows that differ
    near_ties: int = 0
    metric_tolerance: float = 0.0  # how far the served metrics may be from the run's (numeric answers)


def compare_probabilities(served_ids: np.ndarray, served_p: np.ndarray, offline_ids: np.ndarray,
                          offline_p: Optional[np.ndarray], atol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row by row: the largest class-probability difference; whether the label flipped on a near tie (the
    run's own top two probabilities within 2 x atol, so precision explains the flip); and whether the row
    differs (a flip that is no near tie, or a probability difference above atol)."""
    same = served_ids == offline_ids
    diff = np.abs(served_p - offline_p).max(axis=1) if offline_p is not None else np.zeros(len(served_ids))
    tie = np.zeros(len(same), dtype=bool)
    if offline_p is not None and offline_p.shape[1] > 1:
        top2 = np.sort(offline_p, axis=1)[:, -2:]
        tie = ~same & (diff <= atol) & (top2[:, 1] - top2[:, 0] <= 2 * atol)
    return diff, tie, (~same & ~tie) | (diff > atol)


def compare_labels(served: pd.DataFrame, rows: pd.DataFrame, names: Optional[list[str]],
                   offline_metrics: Optional[dict], atol: float) -> Agreement:
    """`served`: label_id and probabilities per row; `rows`: the held-out rows (text, and where known the
    label id, the run's prediction and probabilities, row_id)."""
    from spark_tuning.evaluate.metrics import classification_metrics

    out = Agreement()
    if "label" in rows.columns and rows["label"].notna().all():
        names = names or [str(i) for i in range(len(served["probabilities"].iloc[0]))]
        m = classification_metrics(served["label_id"].to_numpy(), rows["label"].astype(int).to_numpy(), names)
        out.metrics = {k: m[k] for k in LABEL_METRICS}
    if offline_metrics:
        out.offline = {k: offline_metrics[k] for k in LABEL_METRICS}
    if "prediction" not in rows.columns:
        return out
    served_ids, offline_ids = served["label_id"].to_numpy(), rows["prediction"].to_numpy()
    out.agreement = float((served_ids == offline_ids).mean())
    offline_p = np.stack(rows["probabilities"].to_numpy()) if "probabilities" in rows.columns else None
    diff, tie, differs = compare_probabilities(served_ids, np.stack(served["probabilities"].to_numpy()),
                                               offline_ids, offline_p, atol)
    out.max_probability_diff = float(diff.max()) if len(diff) else 0.0
    out.near_ties = int(tie.sum())
    for i in np.flatnonzero(differs):
        out.differences.append({
            "row": int(i), "row_id": int(rows["row_id"].iloc[i]) if "row_id" in rows else int(i),
            "text": str(rows["text"].iloc[i])[:80], "offline_label": int(rows["prediction"].iloc[i]),
            "served_label": int(served["label_id"].iloc[i]), "probability_diff": float(diff[i])})
    return out
