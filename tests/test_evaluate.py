"""Metrics against values worked out by hand, and the plots are real PNG files."""

from __future__ import annotations

import pytest

from spark_tuning.evaluate.metrics import classification_metrics, plot_confusion_matrix, plot_curves


def test_binary_metrics_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 1, 0, 0, 0, 1, 0, 1]  # TP=3 FN=1 TN=3 FP=1
    m = classification_metrics(preds, labels, ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75) and m["average"] == "binary"
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["per_class"]["neg"]["support"] == 4


def test_multiclass_uses_macro_average():
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 2], ["a", "b", "c"])
    assert m["average"] == "macro"
    # recall per class: a 1, b 0.5, c 1 -> macro 0.8333
    assert m["recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_plots_are_png(tmp_path):
    p = plot_confusion_matrix([[3, 1], [1, 3]], ["neg", "pos"], str(tmp_path / "cm.png"))
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    q = plot_curves([{"step": 1, "train_loss": 0.7, "learning_rate": 1e-4},
                     {"step": 2, "train_loss": 0.5, "learning_rate": 5e-5}], str(tmp_path / "c.png"))
    assert open(q, "rb").read(4) == b"\x89PNG"
