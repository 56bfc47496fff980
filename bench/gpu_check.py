"""GPU check: the job's own training function on GPUs, with no Spark, Java or MLflow.

    python bench/gpu_check.py OUT_DIR          # CUDA: NCCL + DDP, one process per visible GPU (1 included)
    python bench/gpu_check.py OUT_DIR --cpu    # the same legs on CPU: gloo, 2 processes, tiny shapes

It stages small data sets with pyarrow in the layout the job stages them (loader.write_staged), builds
randomly initialised models of real shapes (nothing is downloaded), and runs `spark_tuning.train.loop.train_fn`
under torchrun, as TorchDistributor does. The legs:
  classify   GPT-2 124M shape, sequence classification, precision auto (bf16 on GPUs >= 8.0), with a
             checkpoint half way
  resume     the same run resumed from that checkpoint: its losses and predictions equal the uninterrupted
             run's (to the tolerance that GPU kernels' summation order leaves)
  fp32_tf32  the classifier in fp32, whose matmuls run on TF32 tensor cores on CUDA
  lora_sft   SmolLM2-135M shape, LoRA SFT with gradient checkpointing, the frozen base in the run's half
             precision
  serve      the classify run's saved model through the served model's own code (serving_model), on the
             GPU: the same labels, probabilities within the precision tolerance
  fsdp       the classify run with distributed.strategy: fsdp (FSDP2; a world of one on one GPU): losses equal
             DDP's to the precision, its sharded checkpoint resumed exactly, its gathered export served
Each training leg records tokens/s, MFU (6 x non-embedding parameters x useful tokens/s, against the matmul
peak measured in the run and against the data sheet), peak GPU memory and the share of time spent waiting for
data, and checks that the loss is finite and falls and that no rank imported pyspark or MLflow. OUT_DIR gets
gpu_check.json and gpu_check.md. Exit 0: every check passed; 1: a check failed; 2: no GPU (without --cpu).
The whole check takes a few minutes on one H200 (the legs are sized for 8 at most) and about one on 2 CPU
cores with --cpu.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense (no sparsity) tensor-core peaks, TFLOP/s per GPU, from the vendors' data sheets: bf16 (= fp16);
# TF32 is half of it on Ampere and Hopper. GPU_PEAK_TFLOPS overrides (bf16) for a card not listed.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("A6000", 155.0), ("RTX 4090", 165.0), ("A40", 150.0),
    ("V100", 125.0), ("T4", 65.0),
]
POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant", "delightful", "charming", "gripping"]
NEGATIVE = ["awful", "boring", "dreadful", "clumsy", "tedious", "terrible", "bland", "painful"]
FORBIDDEN = ("pyspark", "py4j", "mlflow")  # what the ranks must run without


def datasheet_tflops(name: str, precision: str) -> Optional[float]:
    bf16 = float(os.environ["GPU_PEAK_TFLOPS"]) if os.environ.get("GPU_PEAK_TFLOPS") else next(
        (v for k, v in PEAK_BF16_TFLOPS if k.lower() in name.lower()), None)
    if bf16 is None:
        return None
    return bf16 / 2 if precision == "tf32" else bf16


# ----------------------------------------------------------------------------------------------------
# Shapes, models and data


def shapes(cpu: bool) -> dict:
    """Real model shapes on a GPU; tiny ones on CPU, so that --cpu runs every leg in about a minute."""
    if cpu:
        return {"gpt2": dict(n_embd=64, n_layer=2, n_head=2, vocab_size=4096),
                "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=4096),
                "rows": 384, "eval_rows": 64, "reviews_per_row": 2, "max_length": 128, "batch": 8,
                "steps": 16, "fp32_steps": 8, "lora_steps": 16, "lora_batch": 8, "processes": 2}
    # GPT-2 small (124M, vocab 50257 like the original) and SmolLM2-135M-Instruct's shape.
    return {"gpt2": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
            "llama": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152),
            "rows": 12800, "eval_rows": 512, "reviews_per_row": 8, "max_length": 512, "batch": 32,
            "steps": 300, "fp32_steps": 100, "lora_steps": 150, "lora_batch": 16, "processes": None}


def make_tokenizer(folder: str, texts: list[str]):
    """A byte-level BPE tokenizer trained here on the packaged reviews: nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=2048)
    fast.save_pretrained(folder)
    return fast


def make_models(work: str, shape: dict, texts: list[str]) -> dict:
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForCausalLM

    folders = {"gpt2": os.path.join(work, "gpt2"), "llama": os.path.join(work, "llama")}
    tok = make_tokenizer(folders["gpt2"], texts)
    tok.save_pretrained(folders["llama"])
    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(**shape["gpt2"], n_positions=1024, num_labels=2, attn_pdrop=0.0,
                                                    pad_token_id=tok.pad_token_id))
    gpt2.save_pretrained(folders["gpt2"], safe_serialization=True)
    llama = LlamaForCausalLM(LlamaConfig(**shape["llama"], max_position_embeddings=2048, tie_word_embeddings=True,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         bos_token_id=tok.eos_token_id))
    llama.save_pretrained(folders["llama"], safe_serialization=True)
    return {**folders, "tokenizer": tok}


def reviews(n: int, per_row: int, texts: list[str], seed: int) -> tuple[list[str], list[int]]:
    """Packaged reviews stitched together, with three sentiment words that carry the label: a rule a
    randomly initialised model learns within a few hundred steps (the loss falls)."""
    rng = random.Random(seed)
    out, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = (POSITIVE if label else NEGATIVE)
        parts = [texts[rng.randrange(len(texts))] for _ in range(per_row)]
        for w in rng.sample(words, 3):
            parts.insert(rng.randrange(len(parts) + 1), w)
        out.append(" ".join(parts))
        labels.append(label)
    return out, labels


def stage_classification(work: str, tok, shape: dict, texts: list[str]) -> dict:
    from spark_tuning.loader.staging import write_staged

    train_t, train_y = reviews(shape["rows"], shape["reviews_per_row"], texts, seed=1)
    eval_t, eval_y = reviews(shape["eval_rows"], shape["reviews_per_row"], texts, seed=2)
    enc = lambda t: tok(t, truncation=True, max_length=shape["max_length"])["input_ids"]  # noqa: E731
    n_files = 2 * (shape["processes"] or 1)
    train = write_staged(os.path.join(work, "cls-train"), enc(train_t), train_y, num_files=n_files)
    evalr = write_staged(os.path.join(work, "cls-eval"), enc(eval_t), eval_y, num_files=n_files)
    return {"train": vars(train), "eval": vars(evalr), "eval_texts": eval_t}


def stage_sft(work: str, tok, shape: dict, texts: list[str]) -> dict:
    """Prompt (a review) -> response (its sentiment word): the loss counts the response tokens only."""
    from spark_tuning.loader.staging import IGNORE_INDEX, write_staged

    def rows(n: int, seed: int):
        t, y = reviews(n, max(1, shape["reviews_per_row"] // 2), texts, seed)
        ids, labels = [], []
        for text, label in zip(t, y):
            prompt = tok(f"user: {text}\nassistant: ", add_special_tokens=False)["input_ids"][:shape["max_length"] - 8]
            answer = tok("positive" if label else "negative", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(prompt + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
        return ids, labels

    n_files = 2 * (shape["processes"] or 1)
    ids, labels = rows(shape["rows"] // 2, seed=3)
    train = write_staged(os.path.join(work, "sft-train"), ids, [-1] * len(ids), labels, num_files=n_files)
    ids, labels = rows(shape["eval_rows"], seed=4)
    evalr = write_staged(os.path.join(work, "sft-eval"), ids, [-1] * len(ids), labels, num_files=n_files)
    return {"train": vars(train), "eval": vars(evalr)}


# ----------------------------------------------------------------------------------------------------
# Legs


def leg_payload(work: str, name: str, model_dir: str, data: dict, sets: dict, cpu: bool, processes: int,
                checkpoint: Optional[dict] = None, resume_from: Optional[str] = None, lm: Optional[dict] = None,
                id2label: Optional[dict] = None) -> dict:
    """What TorchDistributor would hand train_fn for this leg (finetune.run builds the same dict)."""
    from spark_tuning.config import load_config

    base = {"output_dir": os.path.join(work, name, "out"), "data.source": "staged-by-gpu-check",
            "model.source": model_dir, "seed": 0, "train.epochs": 1, "train.log_every_steps": 4 if cpu else 10,
            "train.eval_batch_size": 64, "train.warmup_ratio": 0.05, "distributed.num_processes": processes,
            "distributed.use_gpu": not cpu, "distributed.local_mode": True}
    cfg = load_config(None, [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                             for k, v in {**base, **sets}.items()])
    folder = os.path.join(work, name)
    os.makedirs(os.path.join(folder, "model"), exist_ok=True)
    return {"config": cfg.to_dict(),
            "model_source": {"location": model_dir, "is_local": True, "gguf_file": None},
            "id2label": id2label if id2label is not None else {"0": "negative", "1": "positive"},
            "task_extras": lm or {}, "train_ref": data["train"], "eval_ref": data["eval"], "events": None,
            "model_dir": os.path.join(folder, "model"), "resume_from": resume_from,
            "log_dir": os.path.join(folder, "logs"), "checkpoint": checkpoint}


def run_leg(work: str, name: str, payload: dict, processes: int, deterministic: bool, timeout_s: float) -> dict:
    """train_fn on `processes` ranks under torchrun, as TorchDistributor runs it; rank 0's result."""
    folder = os.path.join(work, name)
    payload_path, result_path = os.path.join(folder, "payload.json"), os.path.join(folder, "result.json")
    with open(payload_path, "w") as f:
        json.dump(payload, f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's deterministic workspace (resume comparison)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc_per_node={processes}", os.path.abspath(__file__), "--worker", payload_path, result_path,
           "--deterministic" if deterministic else "--fast"]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"leg {name}: still running after {timeout_s:.0f} s; the ranks' last lines:\n"
                           + rank_log_tails(os.path.join(folder, "logs"))) from None
    seconds = time.perf_counter() - t
    if proc.returncode != 0 or not os.path.isfile(result_path):
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"leg {name}: torchrun exited {proc.returncode}:\n{tail}\n"
                           + rank_log_tails(os.path.join(folder, "logs")))
    with open(result_path) as f:
        result = json.load(f)
    result["wall_seconds"] = seconds
    return result


def rank_log_tails(log_dir: str, lines: int = 8) -> str:
    out = []
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), errors="replace") as f:
            out.append(f"== {name}\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(out) or "(no rank logs)"


def worker(payload_path: str, result_path: str, deterministic: bool) -> None:
    """One rank (torchrun starts this): the job's train_fn on the payload; rank 0 writes the result."""
    import torch

    from spark_tuning.train.loop import train_fn

    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    with open(payload_path) as f:
        payload = json.load(f)
    result = train_fn(payload)
    result["imported"] = sorted(m for m in FORBIDDEN if m in sys.modules)
    if int(os.environ.get("RANK", 0)) == 0:
        tmp = result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, result_path)


def figures(result: dict, gpu_name: str) -> dict:
    """tokens/s (all windows, and steady: without the first, which holds CUDA start-up and kernel choice),
    MFU against the measured peak and against the data sheet, memory, loader wait."""
    history = result["history"]
    steady = history[1:] or history
    tps = result["tokens_per_second"]
    steady_tps = sum(h["tokens_per_second"] for h in steady) / max(1, len(steady))
    precision = "tf32" if result["tf32"] and result["precision"] == "fp32" else result["precision"]
    sheet = datasheet_tflops(gpu_name, precision) if result["device"] == "cuda" else None
    world = result["world_size"]
    return {
        "precision": precision, "processes": world, "steps": result["steps"],
        "tokens_per_second": round(tps), "tokens_per_second_steady": round(steady_tps),
        "mfu_measured_peak": round(result["mfu"], 4),
        "mfu_steady_measured_peak": round(steady_tps * result["flops_per_token"] / (result["matmul_peak_gflops"] * 1e9 * world), 4),
        "matmul_peak_tflops_measured": round(result["matmul_peak_gflops"] / 1000, 2),
        "datasheet_tflops": sheet,
        "mfu_steady_datasheet": round(steady_tps * result["flops_per_token"] / (sheet * 1e12 * world), 4) if sheet else None,
        "peak_gpu_memory_gib": round(result["peak_gpu_memory_bytes"] / 2 ** 30, 2) if result["peak_gpu_memory_bytes"] else None,
        "data_wait_share": round(result["data_wait_share"], 4),
        "train_loss_first": round(history[0]["train_loss"], 4) if history else None,
        "train_loss_last": round(history[-1]["train_loss"], 4) if history else None,
        "parameters": result["parameters"], "trainable_parameters": result["trainable_parameters"],
        "seconds": round(result["wall_seconds"], 1),
    }


def training_checks(result: dict, expected_precision: str) -> dict[str, bool]:
    losses = [h["train_loss"] for h in result["history"]]
    k = max(1, len(losses) // 4)
    return {
        "loss finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "loss falls": len(losses) >= 2 and sum(losses[-k:]) / k < sum(losses[:k]) / k,
        f"precision {expected_precision}": result["precision"] == expected_precision,
        "no pyspark or mlflow in the ranks": not result["imported"],
    }


def resume_checks(full: dict, resumed: dict, from_step: int, cpu: bool) -> tuple[dict[str, bool], dict]:
    """The resumed run must continue exactly where the uninterrupted one was: the same losses after the
    checkpoint's step and the same predictions at the end. CPU: to float rounding; GPU: to what kernels
    with another summation order (flash attention's backward) leave."""
    import numpy as np

    tol = 1e-5 if cpu else 2e-2
    after = {h["step"]: h["train_loss"] for h in full["history"] if h["step"] > from_step}
    mine = {h["step"]: h["train_loss"] for h in resumed["history"] if h["step"] > from_step}
    common = sorted(set(after) & set(mine))
    loss_diff = max((abs(after[s] - mine[s]) / max(1e-9, abs(after[s])) for s in common), default=float("inf"))
    a, b = np.asarray(full["eval"]["probs"]), np.asarray(resumed["eval"]["probs"])
    prob_diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
    checks = {"resumed at the checkpoint's step": bool(common) and resumed["steps"] == full["steps"],
              f"losses after step {from_step} equal (rel. diff <= {tol:g})": loss_diff <= tol,
              f"final probabilities equal (abs. diff <= {tol:g})": prob_diff <= tol}
    return checks, {"loss_rel_diff": loss_diff, "probability_abs_diff": prob_diff, "steps_compared": len(common)}


def serve_leg(model_dir: str, run: dict, texts: list[str], shape: dict, cpu: bool) -> tuple[dict[str, bool], dict]:
    """The saved model through the served model's own class, on the GPU: the run's labels back, its
    probabilities within the tolerance of the two sides' precisions."""
    import numpy as np

    from spark_tuning.train.precision import probability_tolerance
    from spark_tuning.deploy.serving_model import TextClassifier
    from spark_tuning.evaluate.agreement import compare_probabilities

    t = time.perf_counter()
    served = TextClassifier(model_dir, {"max_length": shape["max_length"], "batch_size": 64,
                                        "precision": run["precision"], "device": "cpu" if cpu else "auto"})
    load_s = time.perf_counter() - t
    ev = run["eval"]
    ordered = [texts[i] for i in ev["row_ids"]]
    t = time.perf_counter()
    out = served.predict(ordered)
    predict_s = time.perf_counter() - t
    offline = np.asarray(ev["probs"])
    probs = np.stack(out["probabilities"].to_numpy())
    tol = probability_tolerance((run["precision"], run["device"]), (served.precision, served.device.split(":")[0]))
    diff, ties, differs = compare_probabilities(out["label_id"].to_numpy(), probs, np.asarray(ev["preds"]), offline, tol)
    checks = {f"served on {'cpu' if cpu else 'cuda'}": served.device.startswith("cpu" if cpu else "cuda"),
              f"same labels, probabilities within {tol:g} (near ties excepted)": not differs.any()}
    return checks, {"device": served.device, "precision": served.precision, "rows": len(ordered),
                    "rows_per_second": round(len(ordered) / max(1e-9, predict_s)), "load_seconds": round(load_s, 1),
                    "max_probability_diff": float(diff.max()), "near_ties": int(ties.sum()), "tolerance": tol}


# ----------------------------------------------------------------------------------------------------
# Report


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check, {report['date']}", "",
             f"`python bench/gpu_check.py {'--cpu ' if report['cpu'] else ''}OUT` on {env['device']} "
             f"(torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, peft {env['peft']}); "
             f"{report['seconds']:.0f} s in all. MFU = 6 x non-embedding parameters x useful tokens/s over the peak "
             "(measured in the run by a matmul in the run's precision, and the data sheet's dense peak).", "",
             "| leg | precision | processes | steps | tokens/s (steady) | MFU measured | MFU data sheet | "
             "peak GPU memory | loader wait | loss first -> last | s | checks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, leg in report["legs"].items():
        f = leg.get("figures") or {}
        failed = [k for k, ok in leg["checks"].items() if not ok]
        status = "pass" if not failed and not leg.get("error") else "FAIL: " + "; ".join(failed or ["error"])
        if "precision" in f and "steps" in f:
            mem = f"{f['peak_gpu_memory_gib']} GiB" if f["peak_gpu_memory_gib"] is not None else "n/a"
            sheet = f"{100 * f['mfu_steady_datasheet']:.1f}%" if f["mfu_steady_datasheet"] is not None else "n/a"
            lines.append(f"| {name} | {f['precision']} | {f['processes']} | {f['steps']} | "
                         f"{f['tokens_per_second']:,} ({f['tokens_per_second_steady']:,}) | "
                         f"{100 * f['mfu_steady_measured_peak']:.1f}% | {sheet} | {mem} | "
                         f"{100 * f['data_wait_share']:.2f}% | {f['train_loss_first']} -> {f['train_loss_last']} | "
                         f"{f['seconds']} | {status} |")
        else:
            extra = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items())
            lines.append(f"| {name} | | | | | | | | | | | {status} ({extra}) |")
    return "\n".join(lines) + "\n"


def environment(cpu: bool) -> dict:
    import peft
    import torch
    import transformers

    device = "CPU" if cpu else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} " \
                               f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})"
    return {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": sys.version.split()[0]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu", action="store_true", help="the same legs on CPU: gloo, 2 processes, tiny shapes")
    parser.add_argument("--processes", type=int, default=None, help="training processes (default: every GPU; --cpu: 2)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, staged data, logs)")
    args = parser.parse_args(argv)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch (run with --cpu for the CPU legs)", file=sys.stderr)
        return 2
    shape = shapes(args.cpu)
    processes = args.processes or shape["processes"] or torch.cuda.device_count()
    shape["processes"] = processes
    gpu_name = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    from spark_tuning.train.precision import resolve_precision

    auto = resolve_precision("auto", "cpu" if args.cpu else "cuda:0")
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-check-")
    t0 = time.perf_counter()
    legs: dict[str, dict] = {}
    leg_timeout = 240 if args.cpu else 300
    try:
        from spark_tuning.paths import resolve_package_path

        with open(resolve_package_path("package:spark_tuning/resources/quickstart_reviews.jsonl")) as f:
            texts = [json.loads(line)["text"] for line in f]
        models = make_models(work, shape, texts + POSITIVE + NEGATIVE)
        cls = stage_classification(work, models["tokenizer"], shape, texts)
        sft = stage_sft(work, models["tokenizer"], shape, texts)
        half = shape["steps"] // 2
        cls_sets = {"data.max_length": shape["max_length"], "train.batch_size": shape["batch"],
                    "train.max_steps": shape["steps"], "train.learning_rate": 3e-4 if args.cpu else 1e-4,
                    "train.precision": "auto"}

        def attempt(name: str, body) -> None:
            try:
                body()
            except Exception as e:  # noqa: BLE001 - a failed leg is reported, and the others still run
                legs[name] = {"checks": {"ran": False}, "error": str(e)[-4000:]}
                print(f"gpu_check: leg {name} failed: {e}", file=sys.stderr)

        def classify() -> None:
            ckpt = {"dir": os.path.join(work, "classify", "checkpoints"), "every_steps": half, "keep_last": 5}
            res = run_leg(work, "classify", leg_payload(work, "classify", models["gpt2"], cls, cls_sets, args.cpu,
                                                        processes, checkpoint=ckpt), processes, True, leg_timeout)
            legs["classify"] = {"checks": training_checks(res, auto), "figures": figures(res, gpu_name), "result": res}

        def resume() -> None:
            full = legs["classify"]["result"]
            start = os.path.join(work, "classify", "checkpoints", f"step-{half:08d}")
            ckpt = {"dir": os.path.join(work, "resume", "checkpoints"), "every_steps": half, "keep_last": 5}
            res = run_leg(work, "resume", leg_payload(work, "resume", models["gpt2"], cls, cls_sets, args.cpu, processes,
                                                      checkpoint=ckpt, resume_from=start), processes, True, leg_timeout)
            checks, fig = resume_checks(full, res, half, args.cpu)
            legs["resume"] = {"checks": checks, "figures": {k: (round(v, 6) if isinstance(v, float) else v)
                                                            for k, v in fig.items()}}

        def fp32() -> None:
            sets = {**cls_sets, "train.precision": "fp32", "train.max_steps": shape["fp32_steps"]}
            res = run_leg(work, "fp32_tf32", leg_payload(work, "fp32_tf32", models["gpt2"], cls, sets, args.cpu,
                                                         processes), processes, False, leg_timeout)
            checks = training_checks(res, "fp32")
            checks["TF32 matmuls" if not args.cpu else "no TF32 on CPU"] = res["tf32"] == (not args.cpu)
            legs["fp32_tf32"] = {"checks": checks, "figures": figures(res, gpu_name)}

        def lora_sft() -> None:
            sets = {"task": "sft", "data.max_length": shape["max_length"], "train.batch_size": shape["lora_batch"],
                    "train.max_steps": shape["lora_steps"], "train.learning_rate": 2e-3, "train.precision": "auto",
                    "train.gradient_checkpointing": True, "lora.enabled": True, "lora.r": 8, "lora.alpha": 16,
                    "lora.dropout": 0.0, "data.chat_template": "none"}
            res = run_leg(work, "lora_sft", leg_payload(work, "lora_sft", models["llama"], sft, sets, args.cpu, processes,
                                                        lm={"chat_template": False}, id2label={}), processes, False,
                          leg_timeout)
            checks = training_checks(res, auto)
            checks["eval loss falls"] = res["epochs"][-1]["eval_loss"] < res["epochs"][0]["eval_loss"]
            checks["adapters only (< 5% trainable)"] = res["trainable_parameters"] < 0.05 * res["parameters"]
            legs["lora_sft"] = {"checks": checks, "figures": figures(res, gpu_name)}

        def fsdp() -> None:
            # The classify run again with distributed.strategy: fsdp (FSDP2 over the same processes; on one GPU a
            # world of one, which exercises fully_shard, mixed precision, DCP and the export on CUDA): the same
            # losses as DDP's to the precision, its sharded checkpoint resumed exactly, its export served.
            sets = {**cls_sets, "distributed.strategy": "fsdp"}
            ckpt = {"dir": os.path.join(work, "fsdp", "checkpoints"), "every_steps": half, "keep_last": 5}
            res = run_leg(work, "fsdp", leg_payload(work, "fsdp", models["gpt2"], cls, sets, args.cpu, processes,
                                                    checkpoint=ckpt), processes, True, leg_timeout)
            checks = training_checks(res, auto)
            a = {h["step"]: h["train_loss"] for h in legs["classify"]["result"]["history"]}
            b = {h["step"]: h["train_loss"] for h in res["history"]}
            tol = 1e-4 if auto == "fp32" else 5e-2  # half precision: params cast once per unit vs per op
            diff = max((abs(a[k] - b[k]) / max(1e-9, abs(a[k])) for k in a if k in b), default=float("inf"))
            checks[f"losses equal ddp's (rel. diff <= {tol:g})"] = sorted(a) == sorted(b) and diff <= tol
            start = os.path.join(work, "fsdp", "checkpoints", f"step-{half:08d}")
            checks["sharded checkpoint (dcp)"] = os.path.isfile(os.path.join(start, "dcp", ".metadata"))
            ckpt = {"dir": os.path.join(work, "fsdp_resume", "checkpoints"), "every_steps": half, "keep_last": 5}
            resumed = run_leg(work, "fsdp_resume", leg_payload(work, "fsdp_resume", models["gpt2"], cls, sets, args.cpu,
                                                               processes, checkpoint=ckpt, resume_from=start),
                              processes, True, leg_timeout)
            rchecks, rfig = resume_checks(res, resumed, half, args.cpu)
            schecks, sfig = serve_leg(os.path.join(work, "fsdp", "model"), res, cls["eval_texts"], shape, args.cpu)
            checks.update({f"resume: {k}": v for k, v in rchecks.items()})
            checks.update({f"export served: {k}": v for k, v in schecks.items()})
            fig = figures(res, gpu_name)
            fig.update(loss_rel_diff_vs_ddp=round(diff, 6), resume_loss_rel_diff=round(rfig["loss_rel_diff"], 6),
                       served_max_probability_diff=round(sfig["max_probability_diff"], 6),
                       peak_rss_mb_per_rank=[round(x) for x in res["peak_rss_mb_per_rank"]])
            legs["fsdp"] = {"checks": checks, "figures": fig}

        def serve() -> None:
            checks, fig = serve_leg(os.path.join(work, "classify", "model"), legs["classify"]["result"],
                                    cls["eval_texts"], shape, args.cpu)
            legs["serve"] = {"checks": checks, "figures": fig}

        attempt("classify", classify)
        if "result" in legs.get("classify", {}):
            attempt("resume", resume)
            attempt("serve", serve)
            attempt("fsdp", fsdp)
        attempt("fp32_tf32", fp32)
        attempt("lora_sft", lora_sft)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"gpu_check: work folder kept: {work}", file=sys.stderr)
    for leg in legs.values():
        leg.pop("result", None)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": args.cpu,
              "environment": environment(args.cpu), "seconds": time.perf_counter() - t0, "legs": legs}
    wanted = ["classify", "resume", "serve", "fsdp", "fp32_tf32", "lora_sft"]
    report["ok"] = all(name in legs and all(legs[name]["checks"].values()) for name in wanted)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    for name in wanted:
        for check, ok in (legs.get(name) or {"checks": {"ran": False}})["checks"].items():
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {check}")
    print("gpu_check: " + ("every check passed" if report["ok"] else "a check FAILED"))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], deterministic=sys.argv[4] == "--deterministic")
    else:
        sys.exit(main())
