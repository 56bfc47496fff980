"""data.truncation: head (the tokenizer's own cut), tail, head_tail (data.head_tokens from the start, the rest
from the end). Checked against the model's tokenizer on real review text, in Spark (the Rust backend and the
transformers fallback), in the served model, and in one run whose labels sit only at the end of each text."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pandas as pd
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, tiny_job_config

from spark_tuning.text.truncation import cut


def test_cut_keeps_the_ends_each_mode_names():
    ids = list(range(10))
    assert cut(ids, 6, "head") == [0, 1, 2, 3, 4, 5]
    assert cut(ids, 6, "tail") == [4, 5, 6, 7, 8, 9]
    assert cut(ids, 6, "head_tail", 2) == [0, 1, 6, 7, 8, 9]
    assert cut(ids, 6, "head_tail") == [0, 5, 6, 7, 8, 9]  # head_tokens unset: a quarter of the budget
    assert cut(ids, 12, "head_tail", 2) == ids  # a text that fits is not cut
    assert cut(ids, 6, "head_tail", 9) == [0, 1, 2, 3, 4, 5]  # head_tokens beyond the budget: the head only


def expected(tok, text: str, max_length: int, mode: str, head: int) -> list[int]:
    """What the model must see, built from the tokenizer's plain ids and BERT's [CLS] ... [SEP] by hand."""
    body = tok(text, add_special_tokens=False)["input_ids"]
    budget = max_length - 2
    if len(body) > budget:
        body = {"head": body[:budget], "tail": body[-budget:],
                "head_tail": body[:head] + body[len(body) - (budget - head):]}[mode]
    return [tok.cls_token_id, *body, tok.sep_token_id]


@pytest.fixture(scope="module")
def imdb_texts():
    from conftest import IMDB

    if not os.path.exists(IMDB):
        pytest.skip(f"real IMDB text is not here ({IMDB}): it lives in the project's shared/ folder")
    texts = pd.read_parquet(IMDB, columns=["text"])["text"].head(300).tolist()
    return texts + ["", "short one", "naïve café " * 3000]  # empty, short, and one far over the character cap


@pytest.mark.parametrize("mode", ["head", "tail", "head_tail"])
def test_spark_tokenization_cuts_real_text_as_the_tokenizer(spark, minilm_dir, imdb_texts, mode):
    from transformers import AutoTokenizer

    from spark_tuning.config import ModelConfig
    from spark_tuning.model.sources import ModelSource
    from spark_tuning.text.tokenize import _transformers_udf, rust_encoder, tokenize

    src, mcfg, tok = ModelSource(location=minilm_dir, is_local=True), ModelConfig(), AutoTokenizer.from_pretrained(minilm_dir)
    df = spark.createDataFrame(pd.DataFrame({"row_id": range(len(imdb_texts)), "text": imdb_texts})).repartition(2)
    max_length, head = 128, 32
    want = [expected(tok, t, max_length, mode, head) for t in imdb_texts]
    assert sum(len(tok(t)["input_ids"]) > max_length for t in imdb_texts) > 100  # most reviews are cut
    assert rust_encoder(src, mcfg, max_length, mode, head) is not None  # the fast path reproduces the tokenizer

    got = tokenize(df, src, mcfg, max_length, mode, head).orderBy("row_id").toPandas()
    assert [list(x) for x in got["input_ids"]] == want
    assert (got["length"] <= max_length).all() and got["length"].tolist() == [len(w) for w in want]
    if mode != "head":  # the transformers fallback cuts the same way
        slow = df.withColumn("_t", _transformers_udf(src, mcfg, max_length, mode, head)("text"))
        assert [list(x) for x in slow.orderBy("row_id").select("_t.input_ids").toPandas()["input_ids"]] == want


def test_served_classifier_cuts_long_texts_as_the_run_did(tiny_bert_dir, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

    from spark_tuning.deploy.serving_model import TextClassifier

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    # Large random weights: outputs that move with every input token, so a wrong cut shows.
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(tiny_bert_dir, initializer_range=1.0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    tiny_bert_dir = str(tmp_path / "m")
    texts = [" ".join(["the film was long"] * 30 + ["and the ending was wonderful"]), "short and bland"]
    served = TextClassifier(tiny_bert_dir, {"max_length": 16, "truncation": "head_tail", "head_tokens": 4,
                                            "device": "cpu"})
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    with torch.no_grad():
        own = [torch.softmax(model(input_ids=torch.tensor([expected(tok, t, 16, "head_tail", 4)])).logits, -1)[0].numpy()
               for t in texts]
    np.testing.assert_allclose(served.probabilities(texts), np.stack(own), atol=1e-5)
    head_only = TextClassifier(tiny_bert_dir, {"max_length": 16, "device": "cpu"}).probabilities(texts[:1])
    assert np.abs(head_only - own[0]).max() > 1e-2  # the cut matters for this text


def test_head_tail_run_learns_labels_at_the_end_and_serves_them(spark, tmp_path, tiny_bert_dir):
    """Every review is 40 filler words, then its two sentiment words: at max_length 16 the head holds filler
    only. head_tail trains, evaluates and serves on the end, and the served model agrees with the run."""
    from spark_tuning import finetune

    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(FILLER, k=40) + rng.choices(POSITIVE if i % 2 else NEGATIVE, k=2)),
             "label": "positive" if i % 2 else "negative"} for i in range(160)]
    data = tmp_path / "ends.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.environ["SPARK_TUNING_STATE_DIR"] = str(tmp_path / "servers")
    # The same job also keeps its best evaluation (train.keep_best, evaluated every 8 steps too): the job's
    # end-to-end check of that (tests/test_early_stopping.py has the rest).
    cfg = tiny_job_config(tmp_path, str(data), tiny_bert_dir, **{
        "data.max_length": 16, "data.truncation": "head_tail", "data.head_tokens": 4, "train.epochs": 8,
        "tracking.log_model": True, "deploy.verify": True, "train.eval_every_steps": 8, "train.keep_best": True,
        "train.early_stopping.metric": "accuracy"})
    summary = finetune.run(cfg, spark=spark)
    assert summary.metrics["accuracy"] > 0.9  # the words after the cut were seen
    v = summary.deploy["verify"]
    assert v["ok"] and v["agreement"] == 1.0 and v["rows"] == summary.metrics["num_examples"]

    from mlflow import MlflowClient

    evals = [e for e in summary.result["epochs"] if "best_model_from_step" not in e]
    best = max(evals, key=lambda e: e["eval_accuracy"])  # the first of equals: later ones are no improvement
    saved = json.load(open(os.path.join(summary.output_dir, "metrics.json")))
    assert len(evals) > cfg.train.epochs  # evaluations inside epochs too
    assert saved["best_step"] == best["step"] and saved["best_value"] == best["eval_accuracy"] == saved["accuracy"]
    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.data.metrics["final_best_step"] == best["step"]
