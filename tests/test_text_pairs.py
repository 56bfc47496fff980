"""Text pairs (data.text_pair_column) for classification, regression and multi-label: the tokenizer's pair input
in Spark (ids and token types equal to the tokenizer's own), checks, and one classification run on pairs the
whole way (served with text + text_pair, verified by the job, scored in Spark)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pandas as pd
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, tiny_job_config
from spark_tuning.errors import InputError


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """The label is the sentiment of the *second* text; the first carries a sentiment of its own, at random:
    a model that reads only the first text is at chance."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive, decoy = i % 2 == 0, rng.random() < 0.5
        first = rng.choices(FILLER, k=rng.randint(3, 12)) + rng.choices(POSITIVE if decoy else NEGATIVE, k=3)
        second = rng.choices(FILLER, k=rng.randint(3, 12)) + rng.choices(POSITIVE if positive else NEGATIVE, k=3)
        rng.shuffle(first)
        rng.shuffle(second)
        rows.append({"premise": " ".join(first), "hypothesis": " ".join(second),
                     "label": "positive" if positive else "negative"})
    return rows


def test_pairs_tokenize_as_the_tokenizer_does(spark, tiny_bert_dir):
    from transformers import AutoTokenizer

    from spark_tuning.config import ModelConfig
    from spark_tuning.model.sources import ModelSource
    from spark_tuning.text.tokenize import tokenize

    rows = [("a short text", "and its pair"), ("word " * 80, "a pair that is short"), ("tiny", "long pair " * 60),
            ("naïve café", "東京で映画を見た。")]
    df = spark.createDataFrame(pd.DataFrame(rows, columns=["text", "text_pair"]))
    got = tokenize(df, ModelSource(location=tiny_bert_dir, is_local=True), ModelConfig(source=tiny_bert_dir), 32).toPandas()
    want = AutoTokenizer.from_pretrained(tiny_bert_dir)([r[0] for r in rows], [r[1] for r in rows], truncation=True,
                                                        max_length=32)
    assert [list(x) for x in got["input_ids"]] == want["input_ids"]
    assert [list(x) for x in got["token_type_ids"]] == want["token_type_ids"]
    assert max(got["length"]) == 32 and set(got["token_type_ids"][1]) == {0, 1}  # longest_first kept both texts


def test_a_pair_column_with_nulls_and_a_task_without_pairs_are_refused(spark, tmp_path):
    from spark_tuning.config import ConfigError, DataConfig, load_config
    from spark_tuning.data import dataset

    src = str(tmp_path / "rows.parquet")
    rows = [{"text": f"t{i}", "pair": None if i % 4 == 0 else "p", "label": i % 2} for i in range(12)]
    spark.createDataFrame(pd.DataFrame(rows)).write.parquet(src)
    with pytest.raises(InputError, match=r"data.text_pair_column = 'pair' is null in 3 of 12 rows \(e.g. beside the "
                                         r"text 't\d'\): every row needs both texts"):
        dataset.prepare(spark, DataConfig(source=src, text_pair_column="pair"), seed=1)
    with pytest.raises(ConfigError, match="task token_classification does not read text pairs"):
        load_config(None, ["task=token_classification", "data.text_pair_column=pair"])
    with pytest.raises(ConfigError, match=r"data.text_column and data.label_column and data.text_pair_column name the same column .*: they must differ"):
        load_config(None, ["data.text_pair_column=text"])


def test_classification_on_text_pairs_the_whole_way(spark, tmp_path, tiny_bert_dir):
    from spark_tuning import finetune
    from spark_tuning.deploy import score, serving
    from spark_tuning.deploy.serving import post_json

    os.environ["SPARK_TUNING_STATE_DIR"] = str(tmp_path / "servers")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(200)))
    cfg = tiny_job_config(tmp_path, str(data), tiny_bert_dir, **{
        "data.text_column": "premise", "data.text_pair_column": "hypothesis", "tracking.log_model": True,
        "deploy.registered_model_name": "tiny-pairs", "deploy.verify": True})
    s = finetune.run(cfg, spark=spark)
    assert s.metrics["accuracy"] > 0.9, s.metrics  # the label is in the pair: reading one text gives ~0.5
    v = s.deploy["verify"]
    assert v["ok"] and v["differences"] == [] and v["agreement"] == 1.0, v
    preds = pd.read_parquet(os.path.join(s.output_dir, "eval_predictions.parquet"))
    assert {"text", "text_pair", "prediction"} <= set(preds.columns)
    sample = preds[["row_id", "text", "text_pair"]].head(8)
    server = serving.start("models:/tiny-pairs@candidate", tracking_uri=s.tracking_uri)
    try:
        status, body = post_json(server.url + "/invocations", {"dataframe_records": sample[["text", "text_pair"]]
                                                               .to_dict("records")})
        bad, answer = post_json(server.url + "/invocations", {"inputs": ["only one text"]})
    finally:
        serving.stop(server)
    assert status == 200 and [p["label_id"] for p in body["predictions"]] == preds["prediction"].head(8).tolist()
    assert bad == 400 and "send records with 'text' and 'text_pair'" in json.dumps(answer)
    location = score.localize(spark, "models:/tiny-pairs@candidate", s.tracking_uri, str(tmp_path / "m"))
    with pytest.raises(InputError, match="compares two texts, and the input has no 'text_pair' column"):
        score.score(spark.createDataFrame(sample[["row_id", "text"]]), location)
    scored = score.score(spark.createDataFrame(sample).repartition(2), location).toPandas().set_index("row_id")
    np.testing.assert_allclose(np.stack(scored.loc[sample["row_id"], "probabilities"]),
                               np.stack([p["probabilities"] for p in body["predictions"]]), atol=1e-5)
