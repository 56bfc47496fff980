"""LoRA adapters: the adapter saved alone and merged into the base model reload and agree."""

from __future__ import annotations

import os

import pytest

from lm_fixtures import chat_tokenizer, plain_tokenizer, tiny_gpt2_dir, tiny_llama_dir  # noqa: F401

from spark_tuning.config import LoraSettings
from spark_tuning.errors import InputError


def _trained_like(model, seed: int = 1):
    """LoRA's B matrices start at zero (the adapter is a no-op); give them values as training would."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_adapter_and_merged_model_reload_with_the_same_outputs(tmp_path, which, tiny_llama_dir, tiny_gpt2_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spark_tuning.model import lora

    source = tiny_llama_dir if which == "llama" else tiny_gpt2_dir
    tok = AutoTokenizer.from_pretrained(source)
    tok.pad_token = tok.pad_token or tok.eos_token  # GPT-2 has no pad token (spark-tuning pads with EOS)
    model = _trained_like(lora.apply(AutoModelForCausalLM.from_pretrained(source), LoraSettings(enabled=True), "CAUSAL_LM"))
    model.eval()
    ids = tok(["the film was great", "awful boring plot and the cast"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        before = model(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(source).eval()(**ids).logits
    assert not torch.allclose(before, base, atol=1e-3)  # the adapter does something

    out = str(tmp_path / "out")
    adapter_dir = lora.save(model, tok, out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter_dir))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), adapter_dir).eval()
    with torch.inference_mode():
        torch.testing.assert_close(merged(**ids).logits, before, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(adapted(**ids).logits, before, atol=1e-4, rtol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())
    assert os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors")) < \
        os.path.getsize(os.path.join(out, "model.safetensors"))


def test_default_targets_per_architecture_and_unknown_targets(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from spark_tuning.model import lora

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert lora.target_modules("llama", LoraSettings()) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora.target_modules("gpt2", LoraSettings()) == ["c_attn", "c_proj"]
    with pytest.raises(InputError, match=r"\['c_attn'\] match no layer .*'down_proj'.*'q_proj'"):
        lora.apply(model, LoraSettings(enabled=True, target_modules=["c_attn"]), "CAUSAL_LM")
    with pytest.raises(InputError, match="no default for model type 'weird'"):
        lora.target_modules("weird", LoraSettings())


def test_lora_classifier_on_a_decoder_trains_the_head_and_adapters(tiny_llama_dir):
    from transformers import AutoModelForSequenceClassification

    from spark_tuning.model import lora

    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2)
    peft_model = lora.apply(model, LoraSettings(enabled=True), "SEQ_CLS")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
