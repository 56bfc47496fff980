"""task: multilabel_classification — label lists read and checked in Spark, thresholds, metrics, and one run the
whole way (2 processes, tuned thresholds, served and verified by the job, scored in Spark)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pandas as pd
import pytest

from conftest import FILLER, tiny_job_config
from spark_tuning.errors import InputError

TOPICS = {"acting": ["actor", "actress", "performance", "role"], "music": ["score", "song", "soundtrack", "melody"],
          "visuals": ["camera", "shot", "colour", "lighting"]}


def make_tagged(n: int, seed: int = 0) -> list[dict]:
    """Each row mentions 0-3 topics (two words of each); its labels are those topics. Row i's topics follow
    i's bits, so every combination occurs, the empty one included."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    rows = []
    for i in range(n):
        tags = [t for b, t in enumerate(names) if (i >> b) & 1]
        words = rng.choices(FILLER, k=rng.randint(3, 15)) + [w for t in tags for w in rng.sample(TOPICS[t], 2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "tags": tags})
    return rows


def _prepare(spark, tmp_path, rows, **data):
    from spark_tuning.config import DataConfig
    from spark_tuning.data import dataset

    src = str(tmp_path / "rows.parquet")
    spark.createDataFrame(pd.DataFrame(rows)).coalesce(1).write.parquet(src)
    return dataset.prepare_label_lists(spark, DataConfig(source=src, label_column="tags", validation_fraction=0.25,
                                                         **data), seed=1)


def test_lists_strings_with_a_separator_and_empty_lists(spark, tmp_path):
    rows = [{"text": f"row {i}", "tags": ["a", "b"][: i % 3]} for i in range(24)]
    prepared, freq = _prepare(spark, tmp_path / "lists", rows)
    assert prepared.labels.names == ("a", "b")
    hot = {tuple(r["label"]) for r in prepared.train.collect() + prepared.eval.collect()}
    assert hot == {(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)}  # the empty list is a valid row
    assert freq["train"]["a"] + freq["validation"]["a"] == 16 and freq["train"]["b"] + freq["validation"]["b"] == 8
    joined = [{"text": r["text"], "tags": " | ".join(r["tags"])} for r in rows]
    again, _ = _prepare(spark, tmp_path / "joined", joined, label_separator="|")
    assert sorted(map(tuple, again.train.toPandas()["label"])) == sorted(map(tuple, prepared.train.toPandas()["label"]))


def test_integer_ids_name_by_label_names(spark, tmp_path):
    rows = [{"text": f"row {i}", "tags": [0, 2][: i % 3]} for i in range(24)]
    with pytest.raises(InputError, match=r"labels \['1'\] never occur in the training split"):
        _prepare(spark, tmp_path / "a", rows)  # ids 0..2: id 1 is nowhere
    rows = [{"text": f"row {i}", "tags": [0, 1][: i % 3]} for i in range(24)]
    prepared, _ = _prepare(spark, tmp_path / "b", rows, label_names=["drama", "comedy"])
    assert prepared.labels.names == ("drama", "comedy")
    with pytest.raises(InputError, match=r"label ids \['5'\] are out of range"):
        _prepare(spark, tmp_path / "c", rows + [{"text": "x", "tags": [5]}], label_names=["drama", "comedy"])


@pytest.mark.parametrize("case, rows, settings, message", [
    ("one label per row", [{"text": f"t{i}", "tags": "a"} for i in range(8)], {},
     "holds one string per row (e.g. 'a'), but task multilabel_classification needs a list of labels per row"),
    ("a label outside label_names", [{"text": f"t{i}", "tags": ["a", "b", "zz"]} for i in range(8)],
     {"label_names": ["a", "b"]},
     "labels ['zz'] (8 occurrences) are not in data.label_names = ['a', 'b']"),
    ("a label never in training", [{"text": f"t{i}", "tags": ["a"]} for i in range(8)], {"label_names": ["a", "b"]},
     "labels ['b'] never occur in the training split"),
])
def test_bad_label_lists_are_refused(spark, tmp_path, case, rows, settings, message):
    with pytest.raises(InputError) as e:
        _prepare(spark, tmp_path, rows, **settings)
    assert message in str(e.value) and "data.label_column = 'tags'" in str(e.value)


def test_classification_refuses_a_list_column(spark, tmp_path):
    from spark_tuning.config import DataConfig
    from spark_tuning.data import dataset

    src = str(tmp_path / "rows.parquet")
    spark.createDataFrame(pd.DataFrame([{"text": f"t{i}", "label": ["a", "b"]} for i in range(8)])).write.parquet(src)
    with pytest.raises(InputError, match="holds lists .* use task: multilabel_classification"):
        dataset.prepare(spark, DataConfig(source=src), seed=1)


def test_tuned_thresholds_beat_one_half_where_probabilities_are_shifted():
    from spark_tuning.tasks.multilabel import tune_thresholds

    rng = np.random.default_rng(0)
    truth = rng.random((400, 2)) < 0.4
    probs = np.where(truth, 0.3, 0.1) + rng.random((400, 2)) * 0.05  # never reaches 0.5
    probs[:, 1] = np.where(truth[:, 1], 0.9, 0.2)  # already separated at 0.5
    t = tune_thresholds(probs, truth)
    assert 0.15 <= t[0] <= 0.3 and t[1] == 0.5
    assert ((probs[:, 0] >= t[0]) == truth[:, 0]).all()


def test_metrics_follow_sklearn():
    from sklearn.metrics import f1_score, hamming_loss

    from spark_tuning.evaluate.metrics import multilabel_metrics

    rng = np.random.default_rng(1)
    truth, pred = rng.random((50, 3)) < 0.5, rng.random((50, 3)) < 0.5
    m = multilabel_metrics(pred, truth, ["a", "b", "c"])
    assert m["f1_micro"] == pytest.approx(f1_score(truth, pred, average="micro"))
    assert m["f1_macro"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(truth, pred))
    assert m["subset_accuracy"] == pytest.approx(float((truth == pred).all(axis=1).mean()))
    assert m["per_label"]["b"]["support"] == int(truth[:, 1].sum())


def test_multilabel_the_whole_way(spark, tmp_path, tiny_bert_dir):
    from spark_tuning import finetune
    from spark_tuning.deploy import score, serving
    from spark_tuning.deploy.serving import post_json

    os.environ["SPARK_TUNING_STATE_DIR"] = str(tmp_path / "servers")
    data = tmp_path / "tagged.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_tagged(240)))
    cfg = tiny_job_config(tmp_path, str(data), tiny_bert_dir, **{
        "task": "multilabel_classification", "data.label_column": "tags", "train.epochs": 16,
        "train.tune_thresholds": True, "tracking.log_model": True, "deploy.registered_model_name": "tiny-tags",
        "deploy.verify": True})
    s = finetune.run(cfg, spark=spark)
    m = s.metrics
    assert m["labels"] == ["acting", "music", "visuals"]
    assert m["f1_micro"] > 0.8 and m["subset_accuracy"] > 0.5, m  # chance: micro F1 ~0.5
    assert set(m["thresholds"]) == set(TOPICS) and "optimistic" in m["thresholds_from"] or \
        all(v == 0.5 for v in m["thresholds"].values())
    freq = m["label_frequency"]
    assert freq["train"]["acting"] + freq["validation"]["acting"] == 120
    for name in ("thresholds.json", "label_map.json", "label_f1.png", "eval_predictions.parquet"):
        assert os.path.isfile(os.path.join(s.output_dir, name)), name
    v = s.deploy["verify"]
    assert v["ok"] and v["differences"] == [] and v["agreement"] >= 0.99, v
    preds = pd.read_parquet(os.path.join(s.output_dir, "eval_predictions.parquet"))
    sample = preds[["row_id", "text"]].head(12)
    location = score.localize(spark, "models:/tiny-tags@candidate", s.tracking_uri, str(tmp_path / "m"))
    scored = score.score(spark.createDataFrame(sample).repartition(2), location).toPandas()
    scored = scored.set_index("row_id").loc[sample["row_id"]]
    server = serving.start("models:/tiny-tags@candidate", tracking_uri=s.tracking_uri)
    try:
        status, body = post_json(server.url + "/invocations", {"inputs": sample["text"].tolist()})
    finally:
        serving.stop(server)
    served = pd.DataFrame(body["predictions"])
    assert status == 200 and list(served.columns) == ["labels", "probabilities"]
    assert [list(x) for x in scored["prediction"]] == [list(x) for x in served["labels"]]
    assert [list(x) for x in served["labels"]] == [list(x) for x in preds.set_index("row_id").loc[sample["row_id"], "predicted"]]
    np.testing.assert_allclose(np.stack(scored["probabilities"]), np.stack(served["probabilities"]), atol=1e-5)
