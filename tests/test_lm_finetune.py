"""LLM fine-tuning end to end through the real TorchDistributor (2 CPU processes, gloo): LoRA SFT of a
tiny Llama on synthetic reviews cast as instruction data, and causal-LM training of a tiny GPT-2."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import tiny_job_config
from lm_fixtures import chat_tokenizer, plain_tokenizer, tiny_gpt2_dir, tiny_llama_dir  # noqa: F401


@pytest.fixture(scope="module")
def sft_run(spark, tmp_path_factory, reviews_jsonl, tiny_llama_dir):
    from spark_tuning import finetune

    tmp = tmp_path_factory.mktemp("sft")
    cfg = tiny_job_config(tmp, reviews_jsonl, tiny_llama_dir, **{
        "task": "sft", "lora.enabled": "true", "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0,
        "train.epochs": 3, "train.learning_rate": 2e-2, "train.log_every_steps": 2, "data.max_length": 96,
        "train.gradient_checkpointing": "true", "train.grad_accum_steps": 2, "train.eval_batch_size": 16,
        "train.sample_prompts": "[the film was great, awful boring plot]", "train.sample_max_new_tokens": 4,
        "tracking.log_model": "false",
    })
    return cfg, finetune.run(cfg, spark=spark)


def test_lora_sft_lowers_the_response_loss(sft_run):
    _, s = sft_run
    m = s.metrics
    assert s.result["world_size"] == 2
    assert m["eval_loss"] < m["eval_loss_before"] - 0.1, m
    assert m["eval_perplexity"] == pytest.approx(np.exp(m["eval_loss"]), rel=1e-6)
    assert 0 <= m["accuracy"] <= 1 and "f1" in m and "accuracy_before" in m
    # Only the adapters train: a small share of the parameters.
    assert 0 < m["trainable_parameters"] < 0.2 * m["parameters"]
    assert m["peak_rss_mb"] > 0 and m["train_tokens_per_second"] > 0


def test_adapter_and_merged_model_are_saved_and_agree(sft_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, s = sft_run
    out = s.output_dir
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(cfg.model.source)
    adapted = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["the film was great and the cast superb"], return_tensors="pt")
    with torch.inference_mode():
        a, b = merged(**ids).logits, adapted(**ids).logits
        plain = AutoModelForCausalLM.from_pretrained(cfg.model.source).eval()(**ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-3)  # the fine-tune changed the model
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["adapter_bytes"] < metrics["model_bytes"]


def test_samples_logged_to_mlflow_as_a_table(sft_run):
    from mlflow import MlflowClient

    _, s = sft_run
    client = MlflowClient(s.tracking_uri)
    run = client.get_run(s.run_id)
    assert run.info.status == "FINISHED"
    assert "eval_perplexity" in run.data.metrics and "final_eval_loss_before" in run.data.metrics
    tables = [a.path for a in client.list_artifacts(s.run_id, "samples")]
    assert len(tables) >= 2  # before training and after each epoch
    path = client.download_artifacts(s.run_id, tables[-1])
    table = json.load(open(path))
    assert table["columns"] == ["step", "prompt", "generated"] and len(table["data"]) == 2


def test_causal_lm_with_packing_trains_a_gpt2(spark, tmp_path, reviews_jsonl, tiny_gpt2_dir):
    from spark_tuning import finetune

    cfg = tiny_job_config(tmp_path, reviews_jsonl, tiny_gpt2_dir, **{
        "task": "causal_lm", "data.block_size": 32, "train.epochs": 2, "train.learning_rate": 3e-3,
        "train.log_every_steps": 2, "train.batch_size": 4,
    })
    s = finetune.run(cfg, spark=spark)
    m = s.metrics
    assert m["eval_loss"] < m["eval_loss_before"] - 0.3, m
    assert m["train_padding_share"] == 0  # packed blocks: no padding at all
    assert m["trainable_parameters"] == m["parameters"]  # full fine-tuning
    assert os.path.isfile(os.path.join(s.output_dir, "model.safetensors"))
    assert not os.path.exists(os.path.join(s.output_dir, "adapter"))
