"""The model a run trains: the task's head on the pretrained body, with gradient checkpointing and LoRA
where configured, on the rank's device; and the model a run saves. No distributed code, no task names:
the task object says which head (`task.load_model`) and which peft task type."""

from __future__ import annotations

import os
import resource
import sys


def build_model(task, cfg, src, tokenizer, id2label: dict, device: str = "cpu", dtype=None):
    """The model for `task` on `device`, its weights in `dtype` (None: fp32). Whatever trains is fp32: a
    half-precision base (LoRA) keeps its adapters and any new head in fp32, which the fp16 loss scaler
    needs and bf16 updates want."""
    import torch

    from spark_tuning.model import lora

    model = task.load_model(cfg, src, tokenizer, id2label, device, dtype)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = lora.apply(model, cfg.lora, task.peft_task_type)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def export_model(model, task, cfg, src, tokenizer, id2label: dict):
    """The model to save. A LoRA run whose frozen base was held in bf16/fp16 trained its adapters on that
    copy: they are put back on the base as it was published (fp32, on the CPU), so that the merged model
    equals the adapter applied to the original base. Anything else is saved as it trained."""
    import torch

    if not any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        return model
    export = build_model(task, cfg, src, tokenizer, id2label, "cpu", torch.float32)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = dict(export.named_parameters())
    if set(trained) - set(params):
        raise RuntimeError(f"the fp32 rebuild of the model lacks trained parameters {sorted(set(trained) - set(params))[:5]}")
    with torch.no_grad():
        for name, p in trained.items():
            params[name].copy_(p.detach().to("cpu", torch.float32))
    return export


def rebuild_from(state: dict, task, cfg, src, tokenizer, id2label: dict):
    """A plain fp32 model on the CPU holding `state`, a sharded run's gathered weights. Full fine-tuning: every
    tensor of it. LoRA: the trained tensors only (adapters, new head) on the base as published, as in
    `export_model`: the run's half-precision copy of the base would only round it."""
    import torch

    export = build_model(task, cfg, src, tokenizer, id2label, "cpu", torch.float32)
    trained = {name for name, p in export.named_parameters() if p.requires_grad}
    wanted = {k: v for k, v in state.items() if not cfg.lora.enabled or k in trained}
    missing = trained - set(wanted)
    if missing:
        raise RuntimeError(f"the gathered weights lack trained parameters {sorted(missing)[:5]}")
    result = export.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in wanted.items()},
                                    strict=not cfg.lora.enabled)
    if result.unexpected_keys:
        raise RuntimeError(f"the gathered weights hold tensors the model does not: {result.unexpected_keys[:5]}")
    return export


MMAP_THRESHOLD = 1 << 20  # bytes


def return_large_frees_to_os() -> bool:
    """Serve host allocations of 1 MiB and more with their own mmap, returned to the OS when freed (glibc's
    M_MMAP_THRESHOLD; a user's MALLOC_MMAP_THRESHOLD_ wins). glibc's default raises that threshold as large
    blocks are freed, up to 32 MiB, so tensors of a few MiB land in the heap, which only grows: fsdp's
    per-block all-gathers and reduce-scatters on CPU then held ~1 GB more per rank after a few steps (the
    SmolLM2-135M shape, bench/bench_fsdp.py), at no measured cost in tokens/s. False where it does not apply."""
    import ctypes
    import ctypes.util

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD; 1 on success
    except (OSError, AttributeError):  # not glibc (musl lacks mallopt)
        return False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mb() -> float:
    """This process's resident memory now (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20
    except OSError:
        return 0.0
