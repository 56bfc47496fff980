"""The tokenizer pandas UDF gives exactly what the fast tokenizer gives, truncated and unpadded."""

from __future__ import annotations

from spark_tuning.config import ModelConfig
from spark_tuning.model import ModelSource, load_tokenizer
from spark_tuning.tokenize import tokenize


def test_udf_matches_the_tokenizer(spark, minilm_dir):
    texts = ["a short one", "a much longer review " * 40, "naïve café, déjà vu!", "x"]
    df = spark.createDataFrame([(t, i % 2) for i, t in enumerate(texts)], ["text", "label"]).repartition(2)
    src, mc = ModelSource(minilm_dir, True), ModelConfig(source=minilm_dir)
    rows = {r.text: r for r in tokenize(df, src, mc, max_length=32).collect()}
    tok = load_tokenizer(src, mc)
    for t in texts:
        want = tok(t, truncation=True, max_length=32)["input_ids"]
        assert list(rows[t].input_ids) == want
        assert rows[t].length == len(want) <= 32
    assert rows["x"].length < 32  # not padded
    assert rows[texts[1]].length == 32  # truncated


def test_real_imdb_lengths(spark, imdb_path, minilm_dir):
    df = spark.read.parquet(imdb_path).limit(200)
    out = tokenize(df, ModelSource(minilm_dir, True), ModelConfig(source=minilm_dir), max_length=256)
    lengths = [r.length for r in out.select("length").collect()]
    assert max(lengths) == 256 and min(lengths) < 256
