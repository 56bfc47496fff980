"""The lab's model family done right: a GPT-2-style decoder fine-tuned as a *sequence classifier* (a
classification head on the last real token, not an argmax over language-model logits), through the whole
job and the real TorchDistributor (2 CPU processes). GPT-2's tokenizer has no pad token: the job
must give it one and tell the model which token it is, or the head reads a padding position."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_job_config
from lm_fixtures import plain_tokenizer, tiny_gpt2_dir  # noqa: F401
from spark_tuning.train.precision import probability_tolerance


@pytest.fixture(scope="module")
def gpt2_classifier_run(spark, tmp_path_factory, reviews_jsonl, tiny_gpt2_dir):
    from spark_tuning import finetune

    tmp = tmp_path_factory.mktemp("gpt2-cls")
    # Full fine-tuning: LoRA on a randomly initialised 32-wide model learns too little to test anything
    # (LoRA classifiers on decoders are covered in test_lora.py and by the SmolLM2 runs).
    cfg = tiny_job_config(tmp, reviews_jsonl, tiny_gpt2_dir, **{"train.epochs": 8})
    return cfg, finetune.run(cfg, spark=spark)


def test_gpt2_learns_to_classify(gpt2_classifier_run):
    _, summary = gpt2_classifier_run
    assert summary.result["world_size"] == 2
    assert summary.metrics["num_examples"] == 32
    # The synthetic labels are carried by a few strong words; chance is 0.5.
    assert summary.metrics["accuracy"] > 0.75, summary.metrics
    assert set(summary.metrics) >= {"precision", "recall", "f1"}


def test_merged_classifier_reloads_with_plain_transformers_and_agrees(gpt2_classifier_run):
    """The export is a plain GPT2ForSequenceClassification with its pad token set."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, summary = gpt2_classifier_run
    out = summary.output_dir
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    assert model.config.id2label == {0: "negative", 1: "positive"}

    rows = pd.read_parquet(os.path.join(out, "eval_predictions.parquet"))
    with torch.inference_mode():
        enc = tok(rows["text"].tolist(), truncation=True, max_length=64, padding=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits, dim=-1).numpy()
    assert (probs.argmax(axis=1) == rows["prediction"].to_numpy()).all()
    # The run evaluated in its own precision (bf16 on a CPU with bf16 units), plain transformers in fp32.
    tol = max(1e-4, probability_tolerance((summary.metrics["train_precision"], "cpu"), ("fp32", "cpu")))
    np.testing.assert_allclose(probs, np.stack(rows["probabilities"].to_numpy()), atol=tol)
