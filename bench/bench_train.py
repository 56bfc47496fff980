"""Benchmark 2 (+3), training throughput: spark-tuning's training loop vs the lab's recipe, and MFU.

    PYTHONPATH=. /work/main/.venv/bin/python bench/bench_train.py [--quick]

The same IMDB rows, model, batch size and number of steps through:
  - spark-tuning: `spark_tuning.train.train_fn` itself, one process, reading staged Parquet like a rank
    does (dynamic padding, length-bucketed batches, precision auto);
  - the lab's recipe: `transformers.Trainer` on a `datasets.Dataset` tokenized with padding="max_length".
Useful tokens are non-pad tokens. MFU = 6 x non-embedding parameters x useful tokens/s over the matmul peak
measured in this run (fp32 and bf16 square matmuls). The loader's data-wait share (benchmark 3) comes from
the spark-tuning run's own clock. Alternatives alternate order between models.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

import _common as C
import _shard
from spark_tuning.mfu import matmul_peak, non_embedding_params  # the probe and count train_fn uses


def make_models(tmp: str, tok) -> dict[str, str]:
    """all-MiniLM-L6-v2 as packaged; a GPT-2-size decoder (12 x 768, random init) with MiniLM's tokenizer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt = os.path.join(tmp, "gpt2-size")
    GPT2ForSequenceClassification(GPT2Config(
        vocab_size=tok.vocab_size, n_positions=512, n_embd=768, n_layer=12, n_head=12, num_labels=2,
        pad_token_id=tok.pad_token_id, attn_pdrop=0.0)).save_pretrained(gpt, safe_serialization=True)
    tok.save_pretrained(gpt)
    return {"all-MiniLM-L6-v2": C.minilm_dir(), "GPT-2 size (124M body, random)": gpt}


def run_ours(tmp, name, model_dir, train_ref, eval_ref, steps, batch, max_length) -> dict:
    from spark_tuning.config import load_config
    from spark_tuning.train import train_fn

    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "output_dir": os.path.join(tmp, "out"), "data.source": "unused", "model.source": model_dir,
        "data.max_length": max_length, "train.epochs": 1, "train.max_steps": steps, "train.batch_size": batch,
        "train.eval_batch_size": 32, "train.log_every_steps": steps, "distributed.num_processes": 1,
        "train.warmup_ratio": 0.0, "model.attention_dropout": 0.0}.items()])
    model_out = tempfile.mkdtemp(dir=tmp)
    payload = {"config": cfg.to_dict(), "model_source": {"location": model_dir, "is_local": True, "gguf_file": None},
               "id2label": {"0": "neg", "1": "pos"}, "train_ref": vars(train_ref), "eval_ref": vars(eval_ref),
               "run": None, "model_dir": model_out, "resume_from": None, "log_dir": None, "checkpoint": None}
    res = train_fn(payload)
    return {"useful_tokens_per_s": res["tokens_per_second"], "padding_share": res["padding_share"],
            "train_s": res["train_seconds"], "data_wait_share": res["data_wait_share"],
            "shard_read_s": res["shard_read_seconds"], "precision": res["precision"],
            "eval_accuracy": res["epochs"][-1]["eval_accuracy"]}


def run_lab(tmp, model_dir, texts, labels, steps, batch, max_length) -> dict:
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_dict({"text": texts, "label": labels})
    ds = ds.map(lambda b: tok(b["text"], padding="max_length", truncation=True, max_length=max_length),
                batched=True).remove_columns(["text"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model.config.pad_token_id = tok.pad_token_id
    args = TrainingArguments(output_dir=os.path.join(tmp, "lab"), per_device_train_batch_size=batch,
                             max_steps=steps, learning_rate=5e-5, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    mean_len = float(np.mean([sum(m) for m in ds["attention_mask"]]))
    useful = steps * batch * mean_len  # random batches: the expected count of non-pad tokens
    return {"useful_tokens_per_s": useful / seconds, "padding_share": 1 - mean_len / max_length, "train_s": seconds,
            "precision": "fp32", "model_params": non_embedding_params(model)}


def main() -> None:
    args = C.mode_args(__doc__.splitlines()[0])
    import torch

    max_length = 512
    plan = {"all-MiniLM-L6-v2": (3, 8)} if args.quick else {"all-MiniLM-L6-v2": (6, 16),
                                                             "GPT-2 size (124M body, random)": (2, 4)}
    n_rows, n_eval = (400, 16) if args.quick else (1200, 64)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    df, ids, tok = _shard.tokenized(n_rows + n_eval, max_length)
    labels = df["label"].tolist()
    train_ref = _shard.stage(os.path.join(tmp, "train"), ids[:n_rows], labels[:n_rows])
    eval_ref = _shard.stage(os.path.join(tmp, "eval"), ids[n_rows:], labels[n_rows:])
    texts = df["text"].tolist()[:n_rows]
    models = make_models(tmp, tok)

    records = []
    with C.measured({"what": "matmul peak"}) as peak:
        peak["fp32_gflops"] = matmul_peak(torch.float32, seconds=2.0)
        peak["bf16_gflops"] = matmul_peak(torch.bfloat16, seconds=2.0)
        peak["bf16_supported_by_onednn"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    records.append(peak)
    print(peak, flush=True)
    for k, (name, (steps, batch)) in enumerate(plan.items()):
        for what in (("ours", "lab") if k % 2 == 0 else ("lab", "ours")):
            with C.measured({"model": name, "what": what, "steps": steps, "batch": batch}) as rec:
                if what == "ours":
                    rec.update(run_ours(tmp, name, models[name], train_ref, eval_ref, steps, batch, max_length))
                else:
                    rec.update(run_lab(tmp, models[name], texts, labels[:n_rows], steps, batch, max_length))
            records.append(rec)
            print(json.dumps(rec, default=str), flush=True)

    rows, loader_rows, verdicts = [], [], []
    for name in plan:
        lab = next(r for r in records if r.get("model") == name and r["what"] == "lab")
        ours = next(r for r in records if r.get("model") == name and r["what"] == "ours")
        params = lab["model_params"]
        for label, r in (("spark-tuning loop", ours), ("lab: HF Trainer, padding=max_length", lab)):
            tps = r["useful_tokens_per_s"]
            rows.append({"model": name, "recipe": label, "x lab": tps / lab["useful_tokens_per_s"],
                         "useful tokens/s": tps, "padding share": f"{r['padding_share']:.0%}",
                         "MFU fp32": f"{6 * params * tps / (peak['fp32_gflops'] * 1e9):.1%}",
                         "train s": r["train_s"], "steps x batch": f"{r['steps']} x {r['batch']}",
                         "precision": r["precision"], "load avg": r["load_before"],
                         "busy others": f"{r['cpu_busy_others']:.0%}"})
        x = ours["useful_tokens_per_s"] / lab["useful_tokens_per_s"]
        verdicts.append(f"{name}: **{x:.2f}x** the lab recipe's useful tokens/s (target >= 5x: "
                        f"{'met' if x >= 5 else 'NOT met'}); padding {ours['padding_share']:.0%} vs "
                        f"{lab['padding_share']:.0%} (target < 10%: {'met' if ours['padding_share'] < 0.10 else 'NOT met'}).")
        loader_rows.append({"model": name, "data wait share": f"{ours['data_wait_share']:.2%}",
                            "shard read s": ours["shard_read_s"], "train s": ours["train_s"],
                            "target < 5%": "met" if ours["data_wait_share"] < 0.05 else "NOT met"})
    sizes = ", ".join(f"{r['model']}: {r['model_params'] / 1e6:.1f}M" for r in records if r.get("what") == "lab")
    body = ("\n".join(f"- {v}" for v in verdicts) + "\n\n"
            f"max_length {max_length}, {n_rows} IMDB train reviews, 1 process with {torch.get_num_threads()} threads, "
            "same batch size and number of steps for both recipes, each timed over all its steps (the first "
            "included). MFU counts 6 x non-embedding parameters "
            f"({sizes}) "
            "x useful tokens/s, attention FLOPs not counted. Validation accuracy after this few steps is noise, so "
            "the accuracy half of the target is not checked here.\n\n"
            + C.table(rows, ["model", "recipe", "x lab", "useful tokens/s", "padding share", "MFU fp32", "train s",
                             "steps x batch", "precision", "load avg", "busy others"])
            + f"\n**Matmul peak measured in this run** ({512}x{512}, best of ~2 s): fp32 {peak['fp32_gflops']:.1f} GFLOP/s, "
            f"bf16 {peak['bf16_gflops']:.2f} GFLOP/s (bf16/fp32 = {peak['bf16_gflops'] / peak['fp32_gflops']:.3f}; "
            f"oneDNN bf16 support: {peak['bf16_supported_by_onednn']}). This CPU has no native bf16 matmul, so bf16 "
            "MFU is not a useful target here and `train.precision: auto` keeps fp32.\n")
    C.write_section("2_train", "2. Training throughput and MFU", body, records)
    C.write_section("3_loader", "3. Loader overhead (default Parquet loader)",
                    "Share of the spark-tuning loop's training time spent waiting for the next batch "
                    "(reading is done once per rank, before training: `shard read s`). Petastorm needs its "
                    "own environment: run `bench/loader_backends.py` there (not part of run.sh).\n\n"
                    + C.table(loader_rows, ["model", "data wait share", "target < 5%", "shard read s", "train s"]),
                    [r for r in records if r.get("what") == "ours"])


if __name__ == "__main__":
    main()
