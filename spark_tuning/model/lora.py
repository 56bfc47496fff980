"""LoRA adapters through peft: defaults per architecture, checks, saving the adapter and the merged model.

No distributed code. A LoRA model is a `peft.PeftModel`; it is saved twice: the adapter alone (small:
`adapter_config.json` + `adapter_model.safetensors`), and merged into the base weights as a plain
Hugging Face model that loads without peft.
"""

from __future__ import annotations

import os
from typing import Optional, TYPE_CHECKING

from spark_tuning.errors import InputError

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import LoraSettings

# Attention projections by model family: the usual LoRA targets (small, and most of the gain).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin"],
}


def target_modules(model_type: str, settings: LoraSettings) -> list[str]:
    if settings.target_modules:
        return list(settings.target_modules)
    if model_type not in DEFAULT_TARGETS:
        raise InputError(
            f"lora.target_modules is not set and there is no default for model type {model_type!r}: "
            f"name the projection layers (known defaults: {sorted(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


def adaptable_names(model) -> list[str]:
    """The short names of layers LoRA can wrap (Linear, GPT-2's Conv1D, Embedding)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d)
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, kinds) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model, targets: list[str]) -> None:
    """Every target must match some layer; list the names that exist when one does not."""
    existing = adaptable_names(model)
    missing = [t for t in targets if t not in existing]
    if missing:
        raise InputError(
            f"lora.target_modules = {targets}: {missing} match no layer of this {model.config.model_type} model; "
            f"its layers are named {existing}: pick target_modules from these"
        )


def check_targets_from_config(config, settings: LoraSettings, auto_model: str) -> list[str]:
    """The same check without loading weights: the model is built on the meta device (no memory)."""
    import torch
    import transformers

    with torch.device("meta"):  # auto_model: the task's transformers class, e.g. AutoModelForCausalLM
        model = getattr(transformers, auto_model).from_config(config)
    targets = target_modules(config.model_type, settings)
    check_targets(model, targets)
    return targets


def apply(model, settings: LoraSettings, task_type: str):
    """Wrap `model` in a LoRA PeftModel: only the adapters (and a new classification head) train."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = target_modules(model.config.model_type, settings)
    check_targets(model, targets)
    config = LoraConfig(
        task_type=getattr(TaskType, task_type),  # the task's peft_task_type: SEQ_CLS, CAUSAL_LM
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
        # GPT-2 stores its projections as Conv1D with transposed weights.
        fan_in_fan_out=model.config.model_type == "gpt2",
    )
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save(model, tokenizer, folder: str, adapter_subdir: str = "adapter") -> Optional[str]:
    """Save a model for export. LoRA: the adapter alone in `folder/adapter_subdir`, then the merged
    model in `folder`. Full fine-tuning: the model in `folder`. Returns the adapter folder or None.
    Merging changes the model in place: call this last."""
    import torch

    adapter_dir = None
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        # A half-precision frozen base (LoRA): merge and save in fp32 on the CPU, so that the merged
        # weights are the trained base plus the fp32 adapter, not that sum rounded to bf16/fp16.
        model = model.to("cpu", dtype=torch.float32)
    if is_lora(model):
        adapter_dir = os.path.join(folder, adapter_subdir)
        model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        model = model.merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return adapter_dir

