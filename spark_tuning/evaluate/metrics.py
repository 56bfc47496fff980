"""Classification metrics with scikit-learn, and the confusion-matrix plot. Pure functions plus one PNG."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def classification_metrics(preds: Sequence[int], labels: Sequence[int], names: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1, a per-class report and the confusion matrix.

    Two classes: precision/recall/F1 of the positive class (id 1), as most users read them for binary
    tasks. More classes: macro averages (every class counts the same, whatever its size).
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support

    preds, labels = np.asarray(preds), np.asarray(labels)
    ids = list(range(len(names)))
    average = "binary" if len(names) == 2 else "macro"
    p, r, f1, _ = precision_recall_fscore_support(labels, preds, labels=ids, average=average, zero_division=0)
    report = classification_report(
        labels, preds, labels=ids, target_names=list(names), output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "precision": float(p),
        "recall": float(r),
        "f1": float(f1),
        "average": average,
        "num_examples": int(len(labels)),
        "per_class": {n: {k: float(v) for k, v in report[n].items()} for n in names},
        "confusion_matrix": confusion_matrix(labels, preds, labels=ids).tolist(),
    }


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    size = max(3.5, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: list[dict], path: str) -> str:
    """Training loss and learning rate per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [h["train_loss"] for h in history])
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    b.plot(steps, [h["learning_rate"] for h in history])
    b.set_xlabel("step")
    b.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def regression_metrics(preds: Sequence[float], targets: Sequence[float]) -> dict:
    """RMSE, MAE, R², Pearson and Spearman correlation (ties get their mean rank), in the target's units."""
    p, t = np.asarray(preds, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    err = p - t
    total = float(((t - t.mean()) ** 2).sum())
    return {
        "rmse": float(np.sqrt((err ** 2).mean())), "mae": float(np.abs(err).mean()),
        "r2": 1.0 - float((err ** 2).sum()) / total if total > 0 else float("nan"),
        "pearson": _correlation(p, t), "spearman": _correlation(_ranks(p), _ranks(t)),
        "target_mean": float(t.mean()), "target_std": float(t.std()), "rows": int(len(t)),
    }


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")  # undefined for a constant side: said so rather than 0
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def plot_predicted_vs_true(preds: Sequence[float], targets: Sequence[float], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, t = np.asarray(preds, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(t, p, s=8, alpha=0.5)
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, label="predicted = true")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def multilabel_metrics(pred: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> dict:
    """Micro / macro / weighted precision, recall and F1, subset accuracy, Hamming loss and a report per
    label, from boolean [rows, labels] predictions and truth (sklearn's definitions; a label with no
    predicted or true rows scores 0, as sklearn's zero_division=0)."""
    from sklearn.metrics import accuracy_score, hamming_loss, precision_recall_fscore_support

    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    out: dict = {"num_examples": int(len(truth)), "labels": list(names)}
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(truth, pred, average=average, zero_division=0)
        out.update({f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)})
    p, r, f, support = precision_recall_fscore_support(truth, pred, average=None, zero_division=0)
    out["per_label"] = {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(support[i]), "predicted": int(pred[:, i].sum())} for i, n in enumerate(names)}
    out["subset_accuracy"] = float(accuracy_score(truth, pred))
    out["hamming_loss"] = float(hamming_loss(truth, pred))
    return out


def plot_label_f1(per_label: dict, path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_label)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), [per_label[n]["f1"] for n in names])
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(title or "F1 per label")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _entity_scores(true: set, pred: set) -> dict:
    """Precision, recall and F1 per type and overall (micro, macro, weighted) of two sets of
    (row, type, start, end) entities: an entity counts only with its exact type and boundaries. Types
    from both sides, zero where undefined: seqeval's classification_report, default mode."""
    types = sorted({e[1] for e in true | pred})

    def prf(t: set, p: set) -> tuple[float, float, float]:
        hit = len(t & p)
        precision, recall = (hit / len(p) if p else 0.0), (hit / len(t) if t else 0.0)
        return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)

    per = {}
    for k in types:
        t, p = {e for e in true if e[1] == k}, {e for e in pred if e[1] == k}
        precision, recall, f1 = prf(t, p)
        per[k] = {"precision": precision, "recall": recall, "f1": f1, "support": len(t)}
    precision, recall, f1 = prf(true, pred)
    support = sum(r["support"] for r in per.values())
    out = {"precision": precision, "recall": recall, "f1": f1, "entities": len(true), "predicted_entities": len(pred),
           "per_type": per}
    for key in ("precision", "recall", "f1"):
        out[f"{key}_macro"] = float(np.mean([r[key] for r in per.values()])) if per else 0.0
        out[f"{key}_weighted"] = (sum(r[key] * r["support"] for r in per.values()) / support) if support else 0.0
    return out


def entity_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Entity-level metrics of tag sequences (one per row; BIO tags), as seqeval computes them, and token
    accuracy (the share of units whose tag is right)."""
    from spark_tuning.text.token_spans import get_entities

    true = {(i, *e) for i, seq in enumerate(gold) for e in get_entities(seq)}
    found = {(i, *e) for i, seq in enumerate(pred) for e in get_entities(seq)}
    tags = sum(len(g) for g in gold)
    right = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    return {**_entity_scores(true, found), "token_accuracy": right / tags if tags else 0.0, "rows": len(gold),
            "units": tags}


def span_metrics(gold: Sequence[Sequence[dict]], pred: Sequence[Sequence[dict]]) -> dict:
    """`entity_metrics` of entities given as character spans ({label, start, end} per entity, per row)."""
    def spans(rows):
        return {(i, e["label"], int(e["start"]), int(e["end"])) for i, es in enumerate(rows) for e in es}

    return {**_entity_scores(spans(gold), spans(pred)), "rows": len(gold)}
