"""Numeric precision: which one a run trains in, the autocast and loss scaler that go with it, and how
far two runs of the same model in different precisions may disagree. No distributed code.

`train.precision: auto` picks, per device:
- CUDA, compute capability >= 8.0 (A100, A10G, L4, H100, H200): bf16 autocast (native bf16 tensor cores);
- CUDA 7.x (V100, T4): fp16 autocast with a dynamic loss scale (`torch.amp.GradScaler`): these GPUs have
  fp16 tensor cores but emulate bf16, which `torch.cuda.is_bf16_supported()` counts as support;
- older GPUs: fp32;
- CPUs: bf16 where the CPU has bf16 units (avx512_bf16 / AMX), else fp32 (emulated bf16 ran ~9x slower than
  fp32 on an AVX2-only CPU here, 4x slower on an AVX-512 one without avx512_bf16).
fp32 on CUDA runs its matmuls on TF32 tensor cores (`torch.set_float32_matmul_precision("high")`): the
fp32 rate of an A100/H100 is a small fraction of its TF32 rate, at about fp16's precision per product.
Weights stay fp32 (master weights) under bf16/fp16 autocast; only LoRA's frozen base is stored in the
half precision (`weights_dtype`), since it never receives an update.
"""

from __future__ import annotations

import contextlib
from typing import Optional

HALF = ("bf16", "fp16")

# The largest difference in a class probability that precision alone explains, per (precision, device
# type) of one side: the served model vs the run's own evaluation (see `probability_tolerance`).
OWN_TOLERANCE = {("fp32", "cpu"): 1e-5, ("fp32", "cuda"): 5e-3,  # cuda fp32 = TF32 products
                 ("fp16", "cpu"): 5e-3, ("fp16", "cuda"): 5e-3, ("bf16", "cpu"): 3e-2, ("bf16", "cuda"): 3e-2}


def choose_precision(requested: str, device_type: str, cuda_capability: Optional[tuple[int, int]] = None,
                     cpu_native_bf16: bool = False) -> str:
    """What `auto` means on this hardware (see the module's docstring); other values are kept."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        major = (cuda_capability or (0, 0))[0]
        return "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"
    return "bf16" if cpu_native_bf16 else "fp32"


def hardware(device: str) -> dict:
    """What choose_precision needs to know about `device`, read off the machine."""
    import torch

    if device.startswith("cuda"):
        return {"cuda_capability": tuple(torch.cuda.get_device_capability(device))}
    return {"cpu_native_bf16": cpu_native_bf16()}


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). oneDNN's own "bf16 supported" is
    not that: it is true on any AVX-512 CPU, where it emulates bf16, and there a bf16 matmul ran at 0.25x
    fp32 (a 2-core Xeon with avx512f/bw/vnni and no avx512_bf16, 2026-12-07)."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is None for p in probes):  # an older torch: oneDNN's answer is all there is
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return any(bool(p()) for p in probes if p is not None)


def resolve_precision(precision: str, device: str) -> str:
    return choose_precision(precision, device.split(":")[0], **hardware(device))


def emulated_warning(precision: str, device: str) -> Optional[str]:
    """A warning for bf16 asked for on a GPU that only emulates it (None when all is well)."""
    if precision != "bf16" or not device.startswith("cuda"):
        return None
    cap = hardware(device)["cuda_capability"]
    if cap[0] >= 8:
        return None
    return (f"train.precision = 'bf16' on a GPU of compute capability {cap[0]}.{cap[1]}, which has no bf16 "
            "tensor cores (bf16 is emulated, slowly): use train.precision: fp16 (or auto) on this GPU")


def autocast(precision: str, device: str):
    """The autocast context for `precision` on `device` (a no-op context for fp32)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=dtype)


def grad_scaler(precision: str, device: str):
    """fp16 needs a loss scale (small gradients underflow fp16); bf16 and fp32 do not: disabled there, the
    scaler passes everything through."""
    import torch

    return torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")


def weights_dtype(precision: str, frozen_base: bool):
    """fp32 master weights, except a frozen (LoRA) base in a half-precision run: half the memory."""
    import torch

    if frozen_base and precision in HALF:
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


def enable_tf32(device: str) -> bool:
    """fp32 matmuls and convolutions on TF32 tensor cores (CUDA only); returns whether it applies."""
    if not device.startswith("cuda"):
        return False
    import torch

    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def probability_tolerance(run: tuple[str, str], served: tuple[str, str]) -> float:
    """How far a served class probability may be from the run's own, given each side's (precision,
    device type): the looser side's own tolerance, and at least 1e-4 across device types (other kernels,
    other summation orders)."""
    tol = max(OWN_TOLERANCE.get(run, 3e-2), OWN_TOLERANCE.get(served, 3e-2))
    return max(tol, 1e-4) if run[1] != served[1] else tol
