"""MFU's parts: the parameters counted, the measured matmul peak, and the ratio."""

from __future__ import annotations

import pytest

from spark_tuning.train.mfu import matmul_peak, mfu, non_embedding_params, training_flops_per_token


def test_embeddings_and_tied_heads_are_not_counted():
    import torch
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    bert = BertForSequenceClassification(BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))
    tables = sum(m.weight.numel() for m in bert.modules() if isinstance(m, torch.nn.Embedding))
    assert tables > 500 * 32  # word + position + type embeddings
    assert non_embedding_params(bert) == sum(p.numel() for p in bert.parameters()) - tables
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # tied: the head is the embedding table
    blocks = sum(p.numel() for p in gpt.transformer.h.parameters())
    blocks += sum(p.numel() for p in gpt.transformer.ln_f.parameters())
    assert non_embedding_params(gpt) == blocks
    assert training_flops_per_token(gpt) == 6 * blocks


def test_matmul_peak_is_measured_in_the_dtype_asked():
    import torch

    fp32 = matmul_peak(torch.float32, seconds=0.2)
    assert 0.1 < fp32 < 1e6  # GFLOP/s: any CPU lands in between


def test_mfu_is_model_flops_over_the_peak_of_all_processes():
    assert mfu(1000, 6e6, peak_gflops=10, processes=2) == pytest.approx(0.3)
    assert mfu(1000, 6e6, peak_gflops=10, processes=1) == pytest.approx(0.6)


def test_peak_probe_leaves_the_global_rng_alone():
    """train_fn probes the peak after a resume has restored the RNG: the probe must not draw from it."""
    import torch

    from spark_tuning.train.mfu import matmul_peak

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    matmul_peak(torch.float32, seconds=0.05)
    assert torch.equal(torch.rand(3), expected)
