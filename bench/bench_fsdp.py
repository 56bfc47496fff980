"""Benchmark 8: ddp vs fsdp, peak memory per rank and tokens/s, side by side in one run.

    PYTHONPATH=. .venv/bin/python bench/bench_fsdp.py [--quick] [--steps 8]   # CPU: gloo (bench/run.sh --fsdp)
    PYTHONPATH=. python bench/bench_fsdp.py --gpu                                          # CUDA: NCCL

A decoder of SmolLM2-135M's shape (30 x 576, 9 heads, vocab 49152, tied embeddings; random weights, nothing
downloaded) trained by the job's own train_fn under torchrun on 2 processes (as TorchDistributor runs it), on
the same SFT rows, steps and seed, four ways: {full fine-tuning, LoRA r=8} x {ddp, fsdp}, precision auto.
Peak memory per rank: the largest peak RSS of the ranks (CPU; the process's whole host memory: Python,
torch, the model load, training), and of it what came after the interpreter and libraries were loaded
(peak RSS minus RSS when train_fn began); peak GPU memory allocated (CUDA). Gradient checkpointing is on and
the evaluation batch small, so that activations and logits do not hide the state. The state-size column is what the
strategy must hold per rank by arithmetic (weights + gradients + AdamW), before activations.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402


def cpu_kind() -> str:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    words = set(flags.split())
    if words & {"avx512_bf16", "amx_bf16"}:
        return "avx512_bf16/AMX"
    return "AVX-512 without bf16 (oneDNN emulates bf16)" if "avx512f" in words else "AVX2-only"


def state_bytes(params: int, trainable: int, world: int, strategy: str, half_base: bool) -> float:
    """Weights + gradients + AdamW (two fp32 moments) per rank, by arithmetic: fp32 master weights; a LoRA
    run's frozen base in half precision and no gradient or optimizer state for it."""
    frozen = params - trainable
    total = 4 * trainable * 4 + frozen * (2 if half_base else 4)  # trainable: weight, grad, 2 moments
    return total / world if strategy == "fsdp" else total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="4 steps")
    parser.add_argument("--gpu", action="store_true", help="CUDA processes (one per GPU; 2 GPUs wanted)")
    parser.add_argument("--legs", default="", help="comma-separated subset of full-ddp,full-fsdp,lora-ddp,lora-fsdp")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "8_fsdp.md"))
    args = parser.parse_args()
    args.steps = 4 if args.quick else args.steps

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cpu = not args.gpu
    processes = 2 if cpu else min(2, torch.cuda.device_count())
    shape = gpu_check.shapes(cpu=False)
    shape.update(rows=64 * processes, eval_rows=16, max_length=128, processes=processes)
    work = tempfile.mkdtemp(prefix="bench-fsdp-")
    rows = []
    try:
        from spark_tuning.paths import resolve_package_path

        with open(resolve_package_path("package:spark_tuning/resources/quickstart_reviews.jsonl")) as f:
            texts = [json.loads(line)["text"] for line in f]
        folder = os.path.join(work, "smollm2-shape")
        tok = gpu_check.make_tokenizer(folder, texts + gpu_check.POSITIVE + gpu_check.NEGATIVE)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape["llama"], max_position_embeddings=2048, tie_word_embeddings=True,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                     bos_token_id=tok.eos_token_id)).save_pretrained(folder, safe_serialization=True)
        data = gpu_check.stage_sft(work, tok, shape, texts)
        base = {"task": "sft", "data.max_length": 128, "train.batch_size": 4, "train.max_steps": args.steps,
                "train.learning_rate": 1e-4, "train.precision": "auto", "train.log_every_steps": 2,
                "data.chat_template": "none", "train.eval_before_training": False,
                # Activations and evaluation logits small beside the state, which is what the strategies differ in.
                "train.gradient_checkpointing": True, "train.eval_batch_size": 4}
        for method, sets in (("full", {}), ("LoRA r=8", {"lora.enabled": True, "lora.r": 8, "lora.alpha": 16,
                                                           "lora.dropout": 0.0})):
            for strategy in ("ddp", "fsdp"):
                name = f"{'lora' if sets else 'full'}-{strategy}"
                if args.legs and name not in args.legs.split(","):
                    continue
                payload = gpu_check.leg_payload(work, name, folder, data, {**base, **sets,
                                                                           "distributed.strategy": strategy},
                                                cpu, processes, lm={"chat_template": False}, id2label={})
                res = gpu_check.run_leg(work, name, payload, processes, False, 1800)
                steady = res["history"][1:] or res["history"]
                rows.append({
                    "method": method, "strategy": strategy, "precision": res["precision"],
                    "peak_rss_mb_per_rank": res["peak_rss_mb_per_rank"],
                    "added_rss_mb_per_rank": [p - s for p, s in zip(res["peak_rss_mb_per_rank"],
                                                                     res["start_rss_mb_per_rank"])],
                    "peak_gpu_gib": (res["peak_gpu_memory_bytes"] or 0) / 2 ** 30,
                    "state_mb": state_bytes(res["parameters"], res["trainable_parameters"], processes, strategy,
                                            bool(sets) and res["precision"] in ("bf16", "fp16")) / 2 ** 20,
                    "tokens_per_second": sum(h["tokens_per_second"] for h in steady) / len(steady),
                    "loss_first": res["history"][0]["train_loss"], "loss_last": res["history"][-1]["train_loss"],
                    "parameters": res["parameters"], "trainable": res["trainable_parameters"],
                    "seconds": res["wall_seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows, cpu, processes, args.steps)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    # bench/fsdp.md: the copy run.sh uses when it does not rerun this; a subset of legs replaces neither.
    for path in () if args.legs else (args.out, os.path.join(ROOT, "bench", "fsdp.md")):
        with open(path, "w") as f:
            f.write(text)
    return 0


def report(rows: list[dict], cpu: bool, processes: int, steps: int) -> str:
    device = f"CPU ({cpu_kind()}, {os.cpu_count()} cores, {platform.machine()})" if cpu else "CUDA"
    mem = (lambda r: max(r["peak_rss_mb_per_rank"])) if cpu else (lambda r: r["peak_gpu_gib"] * 1024)
    added = (lambda r: max(r["added_rss_mb_per_rank"])) if cpu else mem
    what = "peak RSS per rank (MB, largest rank)" if cpu else "peak GPU memory per rank (MB)"
    lines = ["## 8. Sharded data parallel: ddp vs fsdp", "",
             f"_Written by `bench/bench_fsdp.py` on {datetime.date.today()}: SmolLM2-135M shape (random weights), "
             f"{processes} processes, {steps} steps of 4 rows x up to 128 tokens per process, SFT, gradient "
             f"checkpointing on, {device}._", "",
             f"| method | strategy | precision | {what} | of it added by training (MB) | state by arithmetic "
             "(MB/rank) | tokens/s (steady) | loss first -> last |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['strategy']} | {r['precision']} | {mem(r):.0f} | {added(r):.0f} | {r['state_mb']:.0f} | "
                     f"{r['tokens_per_second']:.0f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    lines.append("")
    for method in dict.fromkeys(r["method"] for r in rows):
        pair = [r for s in ("ddp", "fsdp") for r in rows if r["method"] == method and r["strategy"] == s]
        if len(pair) < 2:
            continue
        ddp, fsdp = pair
        label = "full fine-tuning" if method == "full" else method
        lines.append(f"- {label}: fsdp peak memory per rank: {mem(fsdp) / mem(ddp):.2f}x ddp"
                     + (f" ({added(fsdp) / added(ddp):.2f}x of what training added to the process)" if cpu else "")
                     + "; state by arithmetic "
                     f"{fsdp['state_mb'] / ddp['state_mb']:.2f}x; tokens/s {fsdp['tokens_per_second'] / ddp['tokens_per_second']:.2f}x ddp")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
