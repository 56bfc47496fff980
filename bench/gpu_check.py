"""GPU check: a short fine-tune of a GPT-2-size classifier (124M parameters, built from GPT2Config, no
downloads) through the whole job in local mode with `use_gpu: true`; prints tokens per second, model
FLOPs utilisation and peak GPU memory. Run it with bench/gpu_check.sh (which checks the machine first).

MFU = 6 x parameters x tokens per second / the card's dense bf16 peak. Tokens are the real (non-padding)
tokens the model trained on; "steady" leaves out the first logging window (CUDA start-up, kernel choice).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity). Override with
# GPU_PEAK_TFLOPS for a card not listed here.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("A10G", 70.0),  # AWS's A10G: lower clocks than the A10; approximate
    ("A10", 125.0), ("L4", 121.0), ("A6000", 155.0), ("RTX 4090", 165.0), ("A40", 150.0),
]


def peak_tflops(name: str) -> float | None:
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def make_model(folder: str, texts: list[str]) -> int:
    """A GPT-2 (124M) sequence classifier with random weights and a byte-level BPE tokenizer trained here
    on the packaged reviews: nothing is downloaded."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=1024)
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    # GPT-2 small's shape (vocab 50257 like the original, so the parameter count is GPT-2's).
    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257, num_labels=2,
                        attn_pdrop=0.0, pad_token_id=fast.pad_token_id)
    model = GPT2ForSequenceClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def make_data(path: str, texts: list[str], labels: list[str], rows: int, seed: int = 0) -> None:
    """Longer reviews (~260 tokens) stitched from 12 packaged ones, labelled by the first one."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            picks = rng.sample(range(len(texts)), 12)
            f.write(json.dumps({"text": " ".join(texts[i] for i in picks), "label": labels[picks[0]]}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step (default 32)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--cpu", action="store_true",
                        help="smoke-test this script where no GPU is (use_gpu: false; no MFU)")
    args = parser.parse_args()

    import torch

    from spark_tuning import finetune
    from spark_tuning.config import load_config
    from spark_tuning.paths import resolve_package_path

    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_check: no CUDA GPU is visible to torch", file=sys.stderr)
        return 2
    name = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    work = tempfile.mkdtemp(prefix="gpu-check-")
    t0 = time.perf_counter()
    try:
        reviews = [json.loads(l) for l in open(resolve_package_path(
            "package:spark_tuning/resources/quickstart_reviews.jsonl"))]
        texts, labels = [r["text"] for r in reviews], [r["label"] for r in reviews]
        model_dir = os.path.join(work, "gpt2-124m")
        params = make_model(model_dir, texts)
        data = os.path.join(work, "reviews.jsonl")
        make_data(data, texts, labels, args.rows)
        prep_s = time.perf_counter() - t0
        cfg = load_config(None, [
            f"output_dir={work}/out/model", f"data.source={data}", f"model.source={model_dir}",
            f"data.max_length={args.max_length}", "data.validation_fraction=0.02",
            "train.epochs=1", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
            "train.learning_rate=1e-4", "train.warmup_ratio=0.05", "train.log_every_steps=20",
            "train.precision=auto", "distributed.num_processes=1", "distributed.local_mode=true",
            f"distributed.use_gpu={'false' if args.cpu else 'true'}", "spark.master=local[*]", "spark.conf={spark.ui.enabled: 'false'}",
            "tracking.experiment=gpu-check", "tracking.log_model=false",
        ])
        summary = finetune.run(cfg)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    r = summary.result
    history = r["history"]
    steady = history[1:] or history
    steady_tps = sum(h["tokens_per_second"] for h in steady) / len(steady)
    peak = None if args.cpu else peak_tflops(name)

    def mfu(tps: float) -> str:
        return f"{100 * 6 * params * tps / (peak * 1e12):.1f}%" if peak else "n/a (set GPU_PEAK_TFLOPS)"

    report = {
        "gpu": name, "gpu_count_visible": torch.cuda.device_count(), "torch": torch.__version__,
        "parameters": params, "precision": r["precision"], "steps": r["steps"], "batch_size": args.batch_size,
        "train_tokens": r["train_tokens"], "padding_share": round(r["padding_share"], 3),
        "tokens_per_second": round(r["tokens_per_second"]), "tokens_per_second_steady": round(steady_tps),
        "peak_bf16_tflops": peak, "mfu": mfu(r["tokens_per_second"]), "mfu_steady": mfu(steady_tps),
        "peak_gpu_memory_gib": round((r.get("peak_gpu_memory_bytes") or 0) / 2**30, 2),
        "eval_accuracy": round(summary.metrics["accuracy"], 4),
        "seconds": {"prepare": round(prep_s, 1), **{k: round(v, 1) for k, v in summary.timings.items()}},
    }
    print("\n=== gpu_check ===")
    for k, v in report.items():
        print(f"{k:>26}: {v}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
