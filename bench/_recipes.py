"""The two training recipes the benchmarks compare, on the same rows, model and optimiser settings.

- `run_ours`: spark-tuning's training loop itself (`spark_tuning.train.loop.train_fn`), one process, reading
  staged Parquet like a rank does: length buckets, dynamic padding, the config's attention dropout.
- `run_lab`: the lab's recipe: `transformers.Trainer` on a `datasets.Dataset` tokenized with
  padding="max_length", the model's own dropouts.
- `run_lab(..., tuned=True)`: what a careful user writes by hand with the Trainer: no padding at tokenization,
  `DataCollatorWithPadding` (each batch padded to its longest row), `group_by_length=True` (the Trainer's
  length-grouped sampler), attention dropout 0 as spark-tuning's shipped configs set it.

Both use the Trainer's optimiser defaults (fused AdamW, linear decay, no warm-up, no weight decay, gradient
norm clipped at 1.0) and the same seed before the model (and its new classification head) is built.
Useful tokens are the non-pad tokens of the batches each recipe actually trained on.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

import numpy as np

import _common as C  # noqa: F401  (puts the project on sys.path, sets the offline switches)
from spark_tuning.train.mfu import non_embedding_params

LR = 5e-5
SEED = 0


def run_ours(tmp: str, model_dir: str, train_ref, eval_ref, batch: int, max_length: int,
             steps: Optional[int] = None, attention_dropout: Optional[float] = 0.0,
             group_by_length: bool = True, precision: str = "auto") -> dict:
    """`steps` optimizer steps (None: one epoch over train_ref); the eval predictions come back too."""
    from spark_tuning.config import load_config
    from spark_tuning.train.loop import train_fn

    sets = {"output_dir": os.path.join(tmp, "out"), "data.source": "unused", "model.source": model_dir, "seed": SEED,
            "data.max_length": max_length, "train.epochs": 1, "train.batch_size": batch, "train.learning_rate": LR,
            "train.eval_batch_size": 32, "train.log_every_steps": 1000, "distributed.num_processes": 1,
            "train.warmup_ratio": 0.0, "train.weight_decay": 0.0, "train.max_grad_norm": 1.0,
            "train.group_by_length": group_by_length, "train.precision": precision}
    if steps:
        sets["train.max_steps"] = steps
    if attention_dropout is not None:
        sets["model.attention_dropout"] = attention_dropout
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    payload = {"config": cfg.to_dict(), "model_source": {"location": model_dir, "is_local": True, "gguf_file": None},
               "id2label": {"0": "neg", "1": "pos"}, "train_ref": vars(train_ref), "eval_ref": vars(eval_ref),
               "events": None, "model_dir": tempfile.mkdtemp(dir=tmp), "resume_from": None, "log_dir": None,
               "checkpoint": None}
    res = train_fn(payload)
    ev = res["eval"]
    return {"useful_tokens_per_s": res["tokens_per_second"], "padding_share": res["padding_share"],
            "train_s": res["train_seconds"], "steps": res["steps"], "train_tokens": res["train_tokens"],
            "data_wait_share": res["data_wait_share"], "shard_read_s": res["shard_read_seconds"],
            "precision": res["precision"], "mfu": res["mfu"], "matmul_peak_gflops": res["matmul_peak_gflops"],
            "eval_accuracy": res["epochs"][-1]["eval_accuracy"],
            "eval_row_ids": ev["row_ids"], "eval_preds": ev["preds"], "eval_labels": ev["labels"]}


def run_lab(tmp: str, model_dir: str, texts: list[str], labels: list[int], batch: int, max_length: int,
            steps: Optional[int] = None, eval_shard=None, tuned: bool = False) -> dict:
    """`steps` Trainer steps (None: one epoch over the texts); with `eval_shard`, the trained model's
    predictions on it through spark-tuning's own `predict` (the same scoring for every recipe). `tuned`: the
    careful hand-written Trainer recipe (module docstring) instead of the lab's."""
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments, default_data_collator)

    from spark_tuning.model.sources import ATTENTION_DROPOUT_KEYS

    disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_dict({"text": texts, "label": labels})
    padding = False if tuned else "max_length"
    ds = ds.map(lambda b: tok(b["text"], padding=padding, truncation=True, max_length=max_length),
                batched=True).remove_columns(["text"])
    torch.manual_seed(SEED)
    config = AutoConfig.from_pretrained(model_dir, num_labels=2)
    if tuned:  # attention dropout 0, under each architecture's own name for it (as model.attention_dropout sets it)
        for key in ATTENTION_DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, 0.0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)
    model.config.pad_token_id = tok.pad_token_id
    seen = {"useful": 0, "padded": 0}
    base_collate = DataCollatorWithPadding(tok) if tuned else default_data_collator

    def collate(features):  # the Trainer's own collator, counting what each batch really holds
        out = base_collate(features)
        seen["useful"] += int(out["attention_mask"].sum())
        seen["padded"] += int(out["attention_mask"].numel())
        return out

    args = TrainingArguments(output_dir=os.path.join(tmp, "lab"), per_device_train_batch_size=batch,
                             max_steps=steps or -1, num_train_epochs=1, learning_rate=LR, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=SEED,
                             # transformers 5: what group_by_length=True was (LengthGroupedSampler)
                             train_sampling_strategy="group_by_length" if tuned else "random")
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
    t = time.perf_counter()
    state = trainer.train()
    seconds = time.perf_counter() - t
    rec = {"useful_tokens_per_s": seen["useful"] / seconds, "padding_share": 1 - seen["useful"] / seen["padded"],
           "train_s": seconds, "steps": state.global_step, "train_tokens": seen["useful"], "precision": "fp32",
           "model_params": non_embedding_params(model)}
    if eval_shard is not None:
        from spark_tuning.loader.batches import plan_eval_batches
        from spark_tuning.tasks.classification import predict

        out = predict(model, eval_shard, plan_eval_batches(eval_shard, 32), tok.pad_token_id, "cpu", "fp32")
        preds = out["probs"].argmax(1)
        order = np.argsort(out["row_ids"])
        rec.update(eval_row_ids=out["row_ids"][order].tolist(), eval_preds=preds[order].tolist(),
                   eval_labels=out["labels"][order].tolist(), eval_accuracy=float((preds == out["labels"]).mean()))
    return rec
