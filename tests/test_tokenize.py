"""Tokenization in Spark gives exactly what the model's fast tokenizer gives, truncated and unpadded, whether
it runs through the Rust backend alone (the default) or through transformers (the fallback)."""

from __future__ import annotations

import pytest

from lm_fixtures import chat_tokenizer, plain_tokenizer, tiny_gpt2_dir, tiny_llama_dir  # noqa: F401

from spark_tuning.config import ModelConfig
from spark_tuning.model.sources import ModelSource, load_tokenizer
from spark_tuning.text.rust_tokenizer import MAX_CHARS_PER_TOKEN, RustEncoder, encode_flat
from spark_tuning.text.tokenize import rust_encoder, tokenize

TEXTS = ["a short one", "a much longer review " * 40, "naïve café, déjà vu! 東京 🙂", "x", "",
         "   ", "[CLS] inside [SEP] the text <|endoftext|>", "tabs\tand\nnew lines"]


def _rust_ids(src, mc, max_length, texts):
    enc = rust_encoder(src, mc, max_length)
    assert enc is not None, "the Rust backend should reproduce this tokenizer"
    return _rows(*enc.encode(texts))


def _rows(offsets, values):
    return [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def _long_texts(n, seed=0):
    """Texts of 20-120 words of every kind a cut can land next to: punctuation, runs of spaces, tabs and
    new lines, accents, CJK, digits, special-token look-alikes, long subword-split words."""
    import random

    rng = random.Random(seed)
    words = ["film", "the", "unbelievably", "naïve", "café,", "東京で", "(great)", "12,345", "[SEP]", "end.",
             "e-mail@example.com", "🙂", "don't", "Antidisestablishmentarianism", "x"]
    gaps = [" ", " ", " ", "  ", "\t", "\n", " \n ", "   "]
    return ["".join(rng.choice(words) + rng.choice(gaps) for _ in range(rng.randint(20, 120))) for _ in range(n)]


@pytest.mark.parametrize("model", ["minilm_dir", "tiny_gpt2_dir", "tiny_llama_dir"])
def test_cut_before_tokenizing_changes_no_ids(request, model):
    """Long texts are cut where a word ends before the tokenizer reads them (RustEncoder.encode): with a
    small max_length nearly every text here is cut, at every kind of boundary, and the ids must still be
    the AutoTokenizer's for the whole text."""
    folder = request.getfixturevalue(model)
    src, mc = ModelSource(folder, True), ModelConfig(source=folder)
    tok = load_tokenizer(src, mc)
    enc = rust_encoder(src, mc, 16)
    assert enc is not None and enc.cut_at_spaces, "the probes should accept the cut for this tokenizer"
    texts = _long_texts(300) + ["few" + " " * 500 + "words after a gap", "東京で映画を見た。" * 40]
    assert _rows(*enc.encode(texts)) == tok(texts, truncation=True, max_length=16)["input_ids"]


def test_cut_never_splits_an_added_token_that_spans_a_space(tmp_path, minilm_dir):
    """An added token like "new york" is one id for two words: a cut between them changes the last id of
    the cut text. Such a cut text is trusted only when its ids run well past max_length (the margin), so
    the ids stay the AutoTokenizer's wherever the cut lands."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    tok.add_tokens(["new york"])
    tok.save_pretrained(tmp_path)
    src, mc = ModelSource(str(tmp_path), True), ModelConfig(source=str(tmp_path))
    enc = rust_encoder(src, mc, 8)
    assert enc is not None and enc.cut_at_spaces
    words = "internationalization understanding is in".split()
    texts = [" ".join(words[:k] + ["new york"] * j + ["city"] * 12) for k in range(5) for j in range(1, 4)]
    assert any(len(t) > 8 * 6 for t in texts)  # the cut applies
    assert _rows(*enc.encode(texts)) == load_tokenizer(src, mc)(texts, truncation=True, max_length=8)["input_ids"]


def test_left_truncation_keeps_the_end_of_long_texts(minilm_dir):
    """truncation_side='left' keeps a text's last tokens: the character cap before tokenizing must keep
    the end too, and the cut at a space (right truncation only) must not apply."""
    src, mc = ModelSource(minilm_dir, True), ModelConfig(source=minilm_dir)
    tok = load_tokenizer(src, mc)
    tok.truncation_side = "left"
    enc = RustEncoder(tok.backend_tokenizer.to_str(), 8, "left")
    texts = ["start " + "filler " * (8 * MAX_CHARS_PER_TOKEN // 7 + 1) + "the very last words"] + _long_texts(50, seed=1)
    assert len(texts[0]) > 8 * MAX_CHARS_PER_TOKEN  # past the character cap
    got = _rows(*enc.encode(texts))
    assert got == tok(texts, truncation=True, max_length=8)["input_ids"]
    assert tok.decode(got[0], skip_special_tokens=True).endswith("the very last words")


@pytest.mark.parametrize("model", ["minilm_dir", "tiny_gpt2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("max_length", [16, None])
def test_rust_backend_gives_the_autotokenizers_ids(request, model, max_length):
    """WordPiece with [CLS]/[SEP] (MiniLM), byte-level BPE without BOS (GPT-2-like, Llama-like with a
    chat template): truncation=True, max_length, no padding; and no truncation for causal_lm texts."""
    folder = request.getfixturevalue(model)
    src, mc = ModelSource(folder, True), ModelConfig(source=folder)
    tok = load_tokenizer(src, mc)
    if max_length is None:
        want = tok(TEXTS, truncation=False)["input_ids"]
    else:
        want = tok(TEXTS, truncation=True, max_length=max_length, padding=False)["input_ids"]
    got = _rust_ids(src, mc, max_length, TEXTS)
    assert got == want
    if max_length is not None:
        assert max(map(len, got)) == max_length  # the long text was cut, special tokens included
    if model == "minilm_dir":
        assert got[4] == [tok.cls_token_id, tok.sep_token_id]  # empty text still gets [CLS] [SEP]


def test_eos_is_appended_after_every_row(tiny_gpt2_dir):
    src, mc = ModelSource(tiny_gpt2_dir, True), ModelConfig(source=tiny_gpt2_dir)
    tok = load_tokenizer(src, mc)
    offsets, values = encode_flat(rust_encoder(src, mc, None).load(), ["the film", "", "plot"],
                                  append=[tok.eos_token_id])
    rows = [values[offsets[i]:offsets[i + 1]].tolist() for i in range(3)]
    assert rows == [tok(t)["input_ids"] + [tok.eos_token_id] for t in ["the film", "", "plot"]]
    assert values.dtype.name == "int32" and offsets[0] == 0 and offsets[-1] == len(values)


def test_udf_matches_the_tokenizer(spark, minilm_dir):
    df = spark.createDataFrame([(t, i % 2) for i, t in enumerate(TEXTS)], ["text", "label"]).repartition(2)
    src, mc = ModelSource(minilm_dir, True), ModelConfig(source=minilm_dir)
    out = tokenize(df, src, mc, max_length=32)
    assert out.columns == ["text", "label", "input_ids", "length"]
    rows = {r.text: r for r in out.collect()}
    tok = load_tokenizer(src, mc)
    for t in TEXTS:
        want = tok(t, truncation=True, max_length=32)["input_ids"]
        assert list(rows[t].input_ids) == want
        assert rows[t].length == len(want) <= 32
    assert rows["x"].length < 32  # not padded
    assert rows[TEXTS[1]].length == 32  # truncated


def test_transformers_fallback_gives_the_same_rows(spark, minilm_dir):
    """The path taken when the Rust backend cannot reproduce a tokenizer: same rows as the default path."""
    from pyspark.sql import functions as F

    from spark_tuning.text.tokenize import _transformers_udf

    df = spark.createDataFrame([(t,) for t in TEXTS], ["text"]).repartition(2)
    src, mc = ModelSource(minilm_dir, True), ModelConfig(source=minilm_dir)
    slow = df.withColumn("_tok", _transformers_udf(src, mc, 32)(F.col("text"))).select("text", "_tok.*")
    fast = tokenize(df, src, mc, max_length=32)
    assert sorted(map(tuple, slow.collect())) == sorted(map(tuple, fast.collect()))


def test_real_imdb_lengths(spark, imdb_path, minilm_dir):
    df = spark.read.parquet(imdb_path).limit(200)
    out = tokenize(df, ModelSource(minilm_dir, True), ModelConfig(source=minilm_dir), max_length=256)
    lengths = [r.length for r in out.select("length").collect()]
    assert max(lengths) == 256 and min(lengths) < 256
