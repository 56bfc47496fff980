"""task: regression — bad targets refused in Spark before training, the metrics, and one run the whole way:
Spark -> TorchDistributor (2 processes) -> metrics in the target's units -> MLflow model -> served and verified
by the job itself -> Spark batch scoring equal to the endpoint."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pandas as pd
import pytest

from spark_tuning.errors import InputError
from conftest import FILLER, POSITIVE, tiny_job_config


def make_scores(n: int, seed: int = 0) -> list[dict]:
    """The target counts the praise words (0..4) on a scale far from 0 (100 + 5 per word): a run that did
    not undo its standardization would answer numbers near 0."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = i % 5
        words = rng.choices(FILLER, k=rng.randint(3, 20)) + rng.choices(POSITIVE, k=k)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": 100.0 + 5.0 * k})
    return rows


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(spark, tmp_path, rows, **data):
    from spark_tuning.config import DataConfig
    from spark_tuning.data import dataset

    src = str(tmp_path / "rows.parquet")
    # Through Spark, not pandas: pandas would write NaN as null.
    spark.createDataFrame(rows).coalesce(1).write.parquet(src)
    return dataset.prepare_targets(spark, DataConfig(source=src, label_column="score", **data), seed=1)


@pytest.mark.parametrize("case, values, message", [
    ("a list per row", [[1.0, 2.0], [3.0]], "holds lists (array<double>), but task regression takes one number"),
    ("strings", ["high", "low"], "holds string values (e.g. 'high'), but task regression needs numbers"),
    ("nulls", [1.0, None], "1 of 8 rows have no usable target (null, NaN or infinite; e.g. 'null')"),
    ("NaN", [1.0, float("nan")], "1 of 8 rows have no usable target (null, NaN or infinite; e.g. 'NaN')"),
    ("infinity", [1.0, float("inf")], "1 of 8 rows have no usable target"),
    ("a constant", [3.0, 3.0], "every training row has the same target (3.0)"),
])
def test_bad_targets_are_refused_with_the_count_and_an_example(spark, tmp_path, case, values, message):
    rows = [{"text": f"row {i}", "score": values[1] if i == 5 else values[0]} for i in range(8)]
    if case == "a constant":
        rows = [{"text": f"row {i}", "score": 3.0} for i in range(8)]
    with pytest.raises(InputError) as e:
        _prepare(spark, tmp_path, rows, validation_fraction=0.25)
    assert message in str(e.value)
    assert "data.label_column = 'score'" in str(e.value)


def test_regression_config_problems_name_the_setting():
    from spark_tuning.config import load_config

    with pytest.raises(InputError) as e:
        load_config(None, ["task=regression", "data.label_names=[a,b]", "train.regression_loss=l1"])
    msg = str(e.value)
    assert "data.label_names = ['a', 'b'] names classes, and task regression has none" in msg
    assert "train.regression_loss = 'l1' is not one of mse, huber" in msg


def test_metrics_match_their_definitions():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    from spark_tuning.evaluate.metrics import regression_metrics

    rng = np.random.default_rng(0)
    t = rng.normal(size=200)
    p = t + rng.normal(scale=0.5, size=200)
    p[:20] = p[0]  # ties, for Spearman's mean ranks
    m = regression_metrics(p, t)
    assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(t, p)))
    assert m["mae"] == pytest.approx(mean_absolute_error(t, p))
    assert m["r2"] == pytest.approx(r2_score(t, p))
    assert m["pearson"] == pytest.approx(np.corrcoef(p, t)[0, 1])
    scipy_stats = pytest.importorskip("scipy.stats")
    assert m["spearman"] == pytest.approx(scipy_stats.spearmanr(p, t).statistic)
    assert math.isnan(regression_metrics([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["pearson"])  # undefined, not 0


def test_huber_loss_is_taken_when_asked():
    import torch

    from spark_tuning.config import load_config
    from spark_tuning.tasks import get_task

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.tensor([[3.0], [0.0]])})()

    batch = {"input_ids": torch.zeros(2, 1), "attention_mask": torch.ones(2, 1), "labels": torch.tensor([0.0, 0.0])}
    task = get_task("regression")
    mse = task.loss(Fixed(), batch, load_config(None, ["task=regression"]))
    huber = task.loss(Fixed(), batch, load_config(None, ["task=regression", "train.regression_loss=huber"]))
    assert float(mse) == pytest.approx(4.5)  # (9 + 0) / 2
    assert float(huber) == pytest.approx((3.0 - 0.5) / 2)  # linear beyond delta 1: 1 x (3 - 0.5)


def test_regression_the_whole_way(spark, tmp_path, tiny_bert_dir):
    from spark_tuning import finetune
    from spark_tuning.deploy import score, serving
    from spark_tuning.deploy.serving import post_json

    os.environ["SPARK_TUNING_STATE_DIR"] = str(tmp_path / "servers")
    data = _jsonl(tmp_path / "scores.jsonl", make_scores(200))
    cfg = tiny_job_config(tmp_path, data, tiny_bert_dir, **{
        "task": "regression", "data.label_column": "score", "train.epochs": 10,
        "tracking.log_model": True, "deploy.registered_model_name": "tiny-scores", "deploy.verify": True})
    s = finetune.run(cfg, spark=spark)
    m = s.metrics
    # Learnt, and in the target's units: a model answering the mean has R² 0 and RMSE ~7.1.
    assert m["r2"] > 0.5 and m["pearson"] > 0.75, m
    assert m["rmse"] < 5.0 and 100 <= m["train_target_mean"] <= 120
    preds = pd.read_parquet(os.path.join(s.output_dir, "eval_predictions.parquet"))
    assert {"row_id", "text", "label", "prediction"} <= set(preds.columns)
    assert abs(preds["prediction"].mean() - preds["label"].mean()) < 3.0
    for name in ("regression.json", "predicted_vs_true.png", "metrics.json"):
        assert os.path.isfile(os.path.join(s.output_dir, name)), name
    # The job served its own model and checked it row by row.
    v = s.deploy["verify"]
    assert v["ok"] and v["agreement"] == 1.0 and v["rows"] == len(preds), v
    assert v["metrics"]["rmse"] == pytest.approx(m["rmse"], abs=1e-3)
    # Batch scoring in Spark answers what a served endpoint answers.
    location = score.localize(spark, "models:/tiny-scores@candidate", s.tracking_uri, str(tmp_path / "m"))
    sample = preds[["row_id", "text"]].head(12)
    scored = score.score(spark.createDataFrame(sample).repartition(2), location).toPandas()
    scored = scored.set_index("row_id").loc[sample["row_id"]]
    assert dict(score.score(spark.createDataFrame(sample), location).dtypes)["prediction"] == "double"
    server = serving.start("models:/tiny-scores@candidate", tracking_uri=s.tracking_uri)
    try:
        status, body = post_json(server.url + "/invocations", {"inputs": sample["text"].tolist()})
    finally:
        serving.stop(server)
    assert status == 200 and list(pd.DataFrame(body["predictions"]).columns) == ["prediction"]
    np.testing.assert_allclose(scored["prediction"], pd.DataFrame(body["predictions"])["prediction"], atol=1e-4)
    np.testing.assert_allclose(scored["prediction"], preds.set_index("row_id").loc[sample["row_id"], "prediction"],
                               atol=1e-3)
