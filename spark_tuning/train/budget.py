"""What a run costs before it starts: training FLOPs, memory per process, and time on this machine and on
named GPUs. Arithmetic only (no torch, no Spark), and every figure carries its assumptions: `spark-tuning
profile` and the summary at the start of every job show them.

- FLOPs = 6 x N x tokens, N the non-embedding parameters (train/mfu.py counts the same N, so an MFU the
  bench measured converts straight into time). Tokens are those the batches compute, padding included.
  With LoRA the frozen weights get no weight gradients: 6N overstates the work (closer to 4N).
- Memory per process = weights + gradients + AdamW's two moments + activations + runtime. Weights are fp32
  (master weights) except a LoRA base in a bf16/fp16 run (held in half precision); only trainable
  parameters get gradients and optimizer state; fsdp divides those three by the processes and adds two
  transformer blocks gathered whole (the one computing, the next prefetched); DDP keeps its gradients in
  its buckets (gradient_as_bucket_view), no second copy.
- Activations per transformer layer and token: 34 x hidden bytes in half precision, 66 x hidden in fp32
  (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022, without the
  attention-score term: transformers' SDPA attention stores no seq x seq matrix); with gradient
  checkpointing each layer keeps only its input (2 or 4 x hidden bytes) and one layer is recomputed
  whole. A language-model head adds 12 bytes per token and vocabulary entry (the logits, the fp32 copy the
  loss takes, its gradient). The micro-batch is the largest the run can form.
- Time = FLOPs / (peak x MFU). This machine: the matmul peak measured here (train/mfu.py's probe, all its
  cores) at CPU_MFU, what bench/bench_train.py measured for spark-tuning's loop on a CPU. GPUs: datasheet
  dense peaks (no sparsity) at GPU_MFU, an assumption: no GPU run has measured it yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

GB = 1e9

# Dense tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), and memory per GPU.
# fp32 training runs its matmuls on TF32 (precision.enable_tf32).
GPUS = {
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5, "memory_gb": 24},
    "A100 80GB": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0, "memory_gb": 80},
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0, "memory_gb": 80},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0, "memory_gb": 141},
}
# Assumed share of the GPU peak a fine-tuning run turns into model FLOPs (typical of BERT/GPT-2-size models
# with batches of thousands of tokens); bench/gpu_check.py measures it where a GPU is lent.
GPU_MFU = 0.30
# Measured: spark-tuning's loop on a CPU, all-MiniLM-L6-v2 and a GPT-2-size model at max_length 512, against
# the matmul peak measured in the same run (bench/RESULTS.md section 2: 31% and 38% on a 2-core AVX-512 Xeon,
# 39% and 47% on a 2-core AVX2 EPYC).
CPU_MFU = 0.35
RUNTIME_GB = {"cpu": 0.6, "cuda": 0.8}  # Python, torch and transformers (CPU); + the CUDA context (GPU)
GPU_HEADROOM = 0.9  # the share of a GPU's memory a run can plan on (the allocator's fragmentation, NCCL)


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of the model (model/llm.py reads it from the model built on the meta device)."""

    parameters: int
    trainable: int
    non_embedding: int
    hidden: int
    layers: int
    vocab: int
    largest_block: int  # parameters of the largest transformer block (fsdp gathers one at a time)
    lm_head: bool  # logits over the vocabulary (causal_lm, sft)


def training_flops(shape: ModelShape, tokens: float) -> float:
    return 6.0 * shape.non_embedding * tokens


def memory_per_process(shape: ModelShape, precision: str, strategy: str, processes: int, lora: bool,
                       gradient_checkpointing: bool, micro_tokens: int, device: str) -> dict[str, float]:
    """GB per training process, by part, and their total."""
    half = precision in ("bf16", "fp16")
    frozen = shape.parameters - shape.trainable
    shards = processes if strategy == "fsdp" else 1
    weights = (4 * shape.trainable + (2 if lora and half else 4) * frozen) / shards
    gradients = 4 * shape.trainable / shards
    optimizer = 8 * shape.trainable / shards
    gathered = 2 * shape.largest_block * (2 if half else 4) if strategy == "fsdp" else 0
    per_token_layer = (34 if half else 66) * shape.hidden
    if gradient_checkpointing:
        act = micro_tokens * ((2 if half else 4) * shape.hidden * shape.layers + per_token_layer)
    else:
        act = micro_tokens * per_token_layer * shape.layers
    if shape.lm_head:
        act += 12 * micro_tokens * shape.vocab
    parts = {"weights": weights / GB, "gradients": gradients / GB, "optimizer": optimizer / GB,
             "fsdp_gathered_blocks": gathered / GB, "activations": act / GB,
             "runtime": RUNTIME_GB["cuda" if device == "cuda" else "cpu"]}
    parts = {k: round(v, 3) for k, v in parts.items()}
    parts["total"] = round(sum(parts.values()), 3)
    return parts


def seconds(flops: float, peak_gflops: float, mfu: float) -> float:
    return flops / max(1e-9, peak_gflops * 1e9 * mfu)


def gpu_estimates(shape: ModelShape, flops: float, precision: str, processes: int, per_process_gb: float) -> list[dict]:
    """Each named GPU type with `processes` GPUs (one per process): time, GPU-hours, whether the run fits.
    `precision` is the run's; auto becomes bf16, which every GPU named here has."""
    p = "bf16" if precision == "auto" else precision
    out = []
    for name, spec in GPUS.items():
        t = seconds(flops, spec[p] * 1e3 * processes, GPU_MFU)
        out.append({"gpu": name, "gpus": processes, "precision": p, "peak_tflops": spec[p],
                    "hours": round(t / 3600, 4), "gpu_hours": round(t * processes / 3600, 4),
                    "memory_gb": spec["memory_gb"], "fits": per_process_gb <= GPU_HEADROOM * spec["memory_gb"]})
    return out


def host_memory_gb() -> Optional[float]:
    """This machine's available memory (Linux MemAvailable), GB; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        return None
    return None


def micro_batch_tokens(batch_size: int, longest: int, max_tokens_per_batch: Optional[int]) -> int:
    """The most tokens one micro-batch can hold: the token budget, or batch_size rows of the longest row."""
    if max_tokens_per_batch:
        return max_tokens_per_batch
    return batch_size * max(1, longest)


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "n/a"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
