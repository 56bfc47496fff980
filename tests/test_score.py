"""Batch scoring in Spark (local[2]) with the logged model: a pandas UDF, the model loaded once per process."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest


def test_score_adds_columns_matching_the_run(packaged_run, spark, tmp_path):
    from spark_tuning.deploy import score

    cfg, summary = packaged_run
    rows = pd.read_parquet(os.path.join(summary.output_dir, "eval_predictions.parquet"))
    df = spark.createDataFrame(rows[["row_id", "text", "label"]]).repartition(2)
    location = score.localize(spark, summary.deploy["model_uri"], summary.tracking_uri, str(tmp_path / "m"))
    out = score.score(df, location)
    assert out.columns == ["row_id", "text", "label", "prediction", "probability", "probabilities"]
    got = out.toPandas().set_index("row_id").loc[rows["row_id"]]
    assert list(got["prediction"]) == [["negative", "positive"][i] for i in rows["prediction"]]
    np.testing.assert_allclose(got["probability"], rows["probability"], atol=1e-5)
    np.testing.assert_allclose(np.stack(got["probabilities"]), np.stack(rows["probabilities"]), atol=1e-5)


def test_score_refuses_bad_columns(packaged_run, spark, tmp_path):
    from spark_tuning.deploy import score
    from spark_tuning.errors import InputError

    _, summary = packaged_run
    location = score.localize(spark, "models:/tiny-reviews@candidate", summary.tracking_uri, str(tmp_path / "m"))
    df = spark.createDataFrame(pd.DataFrame({"review": ["fine"], "prediction": ["x"]}))
    with pytest.raises(InputError, match="no 'text' column"):
        score.score(df, location)
    with pytest.raises(InputError, match=r"already has column\(s\) \['prediction'\]"):
        score.score(df.withColumnRenamed("review", "text"), location)


def test_score_cli_reads_and_writes_parquet(packaged_run, spark, tmp_path, capsys):
    """The command end to end (same SparkSession: getOrCreate reuses the test one)."""
    from spark_tuning.cli import main

    cfg, summary = packaged_run
    src = tmp_path / "in.parquet"
    # One text over the served model's limit (deploy.max_text_chars, 100,000): clipped as training clips it,
    # not a failed Spark job.
    pd.DataFrame({"text": ["a wonderful, gripping film", "dull and tedious", "the plot was fine",
                           "tedious " * 20_000]}).to_parquet(src)
    out = tmp_path / "scored"
    args = ["score", "--model-uri", "models:/tiny-reviews@candidate", "--tracking-uri", summary.tracking_uri,
            "--input", str(src), "--output", str(out)]
    import glob
    import tempfile

    copies = set(glob.glob(os.path.join(tempfile.gettempdir(), "spark-tuning-model-*")))
    assert main(args) == 0
    assert "1 text(s) over the model's limit" in capsys.readouterr().out
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "spark-tuning-model-*"))) == copies  # its copy removed
    scored = pd.read_parquet(out)
    assert len(scored) == 4 and set(scored["prediction"]) <= {"negative", "positive"}
    assert main(args) == 2  # the output exists: not overwritten without --overwrite
