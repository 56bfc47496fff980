"""The Spark data stage: every source format, checks with clear errors, seeded split and sampling."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from spark_tuning.data import dataset
from spark_tuning.config import DataConfig
from spark_tuning.errors import InputError

ROWS = [{"review": f"review number {i} " + ("good" if i % 2 else "bad"), "sentiment": i % 2} for i in range(50)]


def test_read_every_file_format(spark, tmp_path):
    pdf = pd.DataFrame(ROWS)
    pdf.to_parquet(tmp_path / "d.parquet")
    pdf.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    import datasets

    datasets.Dataset.from_pandas(pdf).save_to_disk(str(tmp_path / "hf"))
    spark.createDataFrame(pdf).write.mode("overwrite").saveAsTable("reviews_table")
    for source in ["d.parquet", "d.csv", "d.jsonl", "hf"]:
        df, _ = dataset.read_source(spark, str(tmp_path / source), "auto")
        got = sorted((r["review"], int(r["sentiment"])) for r in df.collect())
        assert got == sorted((r["review"], r["sentiment"]) for r in ROWS), source
    df, _ = dataset.read_source(spark, "reviews_table", "auto")
    assert df.count() == 50


def test_hf_dataset_dict_split_and_class_names(spark, tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a b", "c d", "e f"], "label": [0, 1, 0]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["g h", "i j"], "label": [1, 0]}, features=features),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(source=str(tmp_path / "dd"), eval_split="test")
    prepared = dataset.prepare(spark, cfg, seed=1)
    assert prepared.labels.names == ("neg", "pos")
    none = {"null_or_empty_text": 0, "no_label": 0}
    assert prepared.counts == {"train_rows": 3, "eval_rows": 2, "rows_dropped": {
        "source": {"rows_read": 3, **none}, "validation source": {"rows_read": 2, **none}}}
    with pytest.raises(InputError, match=r"no split 'validation'.*\['test', 'train'\]"):
        dataset.read_source(spark, str(tmp_path / "dd"), "auto", "validation")


def test_missing_column_lists_what_exists(spark):
    df = spark.createDataFrame(pd.DataFrame(ROWS))
    with pytest.raises(InputError, match=r"data.text_column = 'text'.*it has \['review', 'sentiment'\]"):
        dataset.select_columns(df, "text", "sentiment")


def test_clean_drops_null_and_blank_texts(spark):
    pdf = pd.DataFrame({"text": ["ok", None, "", "   ", "fine"], "label": [0, 1, 1, 0, None]})
    df = spark.createDataFrame(pdf.astype({"label": "Int64"}))
    assert [r.text for r in dataset.clean(df).collect()] == ["ok"]


def test_string_labels_map_to_sorted_ids(spark):
    df = spark.createDataFrame([("a", "pos"), ("b", "neg"), ("c", "neutral")], ["text", "label"])
    info = dataset.infer_labels(df, None, None)
    assert info.names == ("neg", "neutral", "pos") and info.from_strings
    out = {r.text: r.label for r in dataset.encode_labels(df, info).collect()}
    assert out == {"a": 2, "b": 0, "c": 1}


@pytest.mark.parametrize("labels,names,message", [
    (["1", "pos"], None, "mixed types"),
    ([1, 1], None, "single class"),
    ([0, 3], ["a", "b"], r"out of range: \[3\]"),
    (["x", "y"], ["x", "z"], r"labels \['y'\] are not in data.label_names"),
    ([0.5, 1.0], None, "cannot be class ids"),
])
def test_bad_labels(spark, labels, names, message):
    df = spark.createDataFrame([(f"t{i}", v) for i, v in enumerate(labels)], ["text", "label"])
    with pytest.raises(InputError, match=message):
        dataset.infer_labels(df, names, None)


def test_split_is_seeded_exact_and_disjoint(spark):
    df = spark.createDataFrame([(f"text {i}", i % 2) for i in range(200)], ["text", "label"])
    train, val = dataset.split(df, 0.2, seed=7)
    t1, v1 = {r.text for r in train.collect()}, {r.text for r in val.collect()}
    assert len(v1) == 40 and len(t1) == 160 and not (t1 & v1)
    # Same seed, other partitioning: same split. Other seed: another split.
    t2 = {r.text for r in dataset.split(df.repartition(5), 0.2, seed=7)[0].collect()}
    t3 = {r.text for r in dataset.split(df, 0.2, seed=8)[0].collect()}
    assert t2 == t1 and t3 != t1


def test_sample_is_seeded_and_exact(spark):
    df = spark.createDataFrame([(f"text {i}", i % 2) for i in range(100)], ["text", "label"])
    a = [r.text for r in dataset.sample(df, 10, seed=3).collect()]
    b = [r.text for r in dataset.sample(df.repartition(3), 10, seed=3).collect()]
    assert len(a) == 10 and sorted(a) == sorted(b)
    assert dataset.sample(df, 1000, seed=3).count() == 100


def test_prepare_end_to_end(spark, tmp_path):
    rows = ROWS + [{"review": None, "sentiment": 1}, {"review": " ", "sentiment": 0}]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    cfg = DataConfig(source=str(tmp_path / "d.parquet"), text_column="review", label_column="sentiment",
                     validation_fraction=0.2, train_limit=30, eval_limit=5, label_names=["bad", "good"])
    p = dataset.prepare(spark, cfg, seed=42)
    assert p.counts == {"train_rows": 30, "eval_rows": 5, "rows_dropped": {  # the null and the blank review
        "source": {"rows_read": len(ROWS) + 2, "null_or_empty_text": 2, "no_label": 0}}}
    assert p.train.columns == ["text", "label"]
    assert p.labels.id2label == {0: "bad", 1: "good"}


def test_no_rows_left_and_eval_split_on_a_file(spark, tmp_path):
    pd.DataFrame({"text": ["", None, "  "], "label": [0, 1, 0]}).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="no rows left"):
        dataset.prepare(spark, DataConfig(source=str(tmp_path / "empty.parquet")), seed=1)
    with pytest.raises(InputError, match="data.eval_split = 'test' names a split"):
        dataset.prepare(spark, DataConfig(source=str(tmp_path / "empty.parquet"), eval_split="test"), seed=1)


def test_real_imdb_reviews_prepare(spark, imdb_path):
    cfg = DataConfig(source=imdb_path, train_limit=1600, eval_limit=400, label_names=["negative", "positive"])
    p = dataset.prepare(spark, cfg, seed=42)
    assert p.counts == {"train_rows": 1600, "eval_rows": 400, "rows_dropped": {
        "source": {"rows_read": 25000, "null_or_empty_text": 0, "no_label": 0}}}
    balance = p.train.groupBy("label").count().collect()
    assert all(500 < r["count"] < 1100 for r in balance)


def test_validation_labels_sparse_ids_and_nan_labels_are_refused_before_training(spark, tmp_path):
    """Checked in the data stage: a bad validation label used to fail the first evaluation, an epoch in;
    ids {100, 200} silently built a 201-class head; NaN labels got a misleading message."""
    train = pd.DataFrame({"text": [f"review {i}" for i in range(20)], "label": ["pos", "neg"] * 10})
    train.to_parquet(tmp_path / "train.parquet")
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["pos", "neutral", "meh"]}).to_parquet(tmp_path / "eval.parquet")
    cfg = DataConfig(source=str(tmp_path / "train.parquet"), eval_source=str(tmp_path / "eval.parquet"))
    with pytest.raises(InputError, match=r"2 rows have labels that are not among the training classes \['neg', "
                                         r"'pos'\] \(e.g. \['meh', 'neutral'\]\)"):
        dataset.prepare(spark, cfg, seed=1)
    pd.DataFrame({"text": ["a", "b"], "label": [0, 7]}).to_parquet(tmp_path / "eval-ids.parquet")
    pd.DataFrame({"text": train.text, "label": [0, 1] * 10}).to_parquet(tmp_path / "train-ids.parquet")
    with pytest.raises(InputError, match=r"are not class ids 0..1 of the training data \(e.g. \['7'\]\)"):
        dataset.prepare(spark, DataConfig(source=str(tmp_path / "train-ids.parquet"),
                                          eval_source=str(tmp_path / "eval-ids.parquet")), seed=1)
    pd.DataFrame({"text": train.text, "label": [100, 200] * 10}).to_parquet(tmp_path / "sparse.parquet")
    with pytest.raises(InputError, match=r"integer labels \[100, 200\] are not the ids 0..1 .* data.label_names"):
        dataset.prepare(spark, DataConfig(source=str(tmp_path / "sparse.parquet")), seed=1)
    # (pandas writes NaN as null, which is dropped as "no label"; Spark's own NaN and inf are refused)
    spark.createDataFrame([(f"r {i}", [0.0, 1.0, float("nan"), float("inf")][i % 4]) for i in range(20)],
                          "text string, label double").write.parquet(str(tmp_path / "nan.parquet"))
    with pytest.raises(InputError, match="NaN or infinite values in 10 rows"):
        dataset.prepare(spark, DataConfig(source=str(tmp_path / "nan.parquet")), seed=1)
