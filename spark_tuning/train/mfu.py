"""Model FLOPs utilisation: how much of the hardware's measured matmul peak the training turns into model
FLOPs. No distributed code: the training loop decides who measures and shares the result.

MFU = 6 x N x useful tokens/s / (peak per process x processes), where N counts every non-embedding
parameter (trainable or frozen) and useful tokens are the non-pad ones. 6N is the usual estimate of a
training step's FLOPs per token (2N forward, 4N backward); attention's own FLOPs are not counted. With LoRA
the frozen weights need no weight gradients, so 6N overstates the work (closer to 4N + 2 x trainable): MFU
reads high there. The peak is measured, not taken from a data sheet: a square matmul in the precision the
run trains in, on the threads (or GPU) one process has, best of about a second. It goes through
`torch.nn.functional.linear`, the call the models' layers make: on CPUs without bf16 units a bf16
`torch.mm` takes a path ten times slower than a bf16 linear layer does, and would make a bf16 MFU read
over 100%.
"""

from __future__ import annotations

import time


def matmul_peak(dtype, device: str = "cpu", n: int = 512, seconds: float = 1.0) -> float:
    """GFLOP/s of an n x n linear layer in `dtype` on `device`, best of repeated runs within `seconds`.
    GPUs get a larger matrix (4096): 512 is far too small to keep one busy."""
    import torch

    gpu = device.startswith("cuda")
    if gpu:
        n = max(n, 4096)
    # A private generator: drawing from torch's global RNG here would shift rank 0's dropout masks, and a
    # resumed run (which restores the RNG before this probe) would no longer repeat the original one.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    linear = torch.nn.functional.linear  # a @ b.T, the models' own kernel path
    linear(a, b)  # warm-up: kernels chosen, pages touched
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if gpu:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        linear(a, b)
        if gpu:
            torch.cuda.synchronize(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def non_embedding_params(model) -> int:
    """Parameters outside embedding tables (token, position, type embeddings). A tied LM head shares the
    token embedding's weight, so it is not counted either."""
    import torch

    seen = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in seen)


def training_flops_per_token(model) -> int:
    return 6 * non_embedding_params(model)


def mfu(tokens_per_second: float, flops_per_token: float, peak_gflops: float, processes: int = 1) -> float:
    """Share of the peak (per process, measured) that the processes together turn into model FLOPs."""
    return flops_per_token * tokens_per_second / max(1e-9, peak_gflops * 1e9 * processes)
