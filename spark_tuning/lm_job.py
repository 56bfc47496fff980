"""The driver-side steps of the causal_lm and sft tasks (and of LoRA / GGUF models for classification),
called from finetune.run: checks before Spark works, the data stage, and the outputs after training."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from spark_tuning.config import Config, to_yaml
from spark_tuning.errors import InputError
from spark_tuning.model.sources import ModelSource

log = logging.getLogger("spark_tuning")


def needed(cfg: Config, src: ModelSource) -> bool:
    return cfg.task != "classification" or bool(src.gguf_file) or cfg.lora.enabled


def preflight(cfg: Config, src: ModelSource, cache_root: str) -> tuple[ModelSource, dict]:
    """GGUF -> safetensors (cached), then every LM/LoRA setting checked against the model and tokenizer.
    Returns the source to train from and what was resolved (logged with the config)."""
    from spark_tuning.model import llm
    from spark_tuning.model.sources import load_tokenizer

    src = llm.dequantize_gguf(src, cfg.model, cache_root)
    tokenizer = load_tokenizer(src, cfg.model)
    info = llm.check_settings(cfg, src, tokenizer)
    total, trainable = count_trainable(cfg, src)
    info.update(parameters=total, trainable_parameters=trainable,
                trainable_percent=round(100 * trainable / max(1, total), 3))
    log.info("model %s: %d parameters, %d trainable (%.3f%%)%s", src.location, total, trainable,
             info["trainable_percent"], f", LoRA on {info['lora_targets']}" if cfg.lora.enabled else "")
    return src, info


def count_trainable(cfg: Config, src: ModelSource) -> tuple[int, int]:
    """Parameter counts of the model as it will train, built on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from spark_tuning.model import lora

    config = AutoConfig.from_pretrained(src.location, **src.load_kwargs(cfg.model))
    auto = AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
        if cfg.lora.enabled:
            model = lora.apply(model, cfg.lora, cfg.task)
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Staged:
    prepared: Any  # lm_data.LmPrepared (its DataFrames are unpersisted at the end)
    train_ref: Any
    eval_ref: Any
    figures: dict
    payload: dict  # goes to every rank as payload["lm"]
    id2label: dict


def stage(spark, cfg: Config, src: ModelSource, info: dict, staging: str) -> Staged:
    """Spark: read, check, split, tokenize (sft: render + mask; causal_lm: pack), stage as Parquet."""
    from spark_tuning.text import lm_data
    from spark_tuning.loader.staging import stage as write_stage

    prepared = lm_data.prepare_lm(spark, cfg)
    n_files = 2 * cfg.distributed.num_processes
    figures: dict[str, Any] = dict(prepared.counts)
    payload: dict[str, Any] = {"chat_template": bool(info.get("chat_template"))}
    if cfg.task == "causal_lm":
        parts = {}
        for name, df in (("train", prepared.train), ("eval", prepared.eval)):
            ids = lm_data.tokenize_texts(df, src, cfg.model).cache()
            blocks = lm_data.pack(ids, cfg.data.block_size)
            parts[name] = write_stage(blocks, os.path.join(staging, name), n_files)
            total = lm_data.token_count(ids)
            kept = parts[name].num_rows * cfg.data.block_size
            figures[f"{name}_tokens"], figures[f"{name}_blocks"] = total, parts[name].num_rows
            figures[f"{name}_tokens_dropped"] = total - kept  # partition remainders, < block_size each
            ids.unpersist()
        if not parts["train"].num_rows or not parts["eval"].num_rows:
            raise InputError(
                f"data.block_size = {cfg.data.block_size}: the data fills {parts['train'].num_rows} training and "
                f"{parts['eval'].num_rows} validation blocks; both need at least one: lower data.block_size or add text"
            )
        train_ref, eval_ref = parts["train"], parts["eval"]
    else:
        train_ref = write_stage(lm_data.tokenize_chats(prepared.train, src, cfg.model, cfg.data.max_length,
                                                       payload["chat_template"]).drop("text"),
                                os.path.join(staging, "train"), n_files)
        eval_ref = write_stage(lm_data.tokenize_chats(prepared.eval, src, cfg.model, cfg.data.max_length,
                                                      payload["chat_template"]),
                               os.path.join(staging, "eval"), n_files)
        figures.update(_sft_stats(spark, train_ref.path, cfg.data.max_length))
    id2label: dict = {}
    if prepared.label_names:
        names = list(prepared.label_names)
        id2label = dict(enumerate(names))
        payload.update(sft_classification=True, label_names=names,
                       label_first_tokens=label_first_tokens(src, cfg, names, payload["chat_template"]))
    figures.update(info)
    return Staged(prepared, train_ref, eval_ref, figures, payload, id2label)


def label_first_tokens(src: ModelSource, cfg: Config, names: list[str], with_template: bool) -> Optional[list[int]]:
    """The first response token of each label name, as the model sees it after the prompt. None (no
    label accuracy, with a warning) when two labels start with the same token."""
    from spark_tuning.text import lm_data
    from spark_tuning.model.sources import load_tokenizer

    tok = load_tokenizer(src, cfg.model)
    firsts = []
    for name in names:
        _, labels = lm_data.encode_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": name}],
                                        with_template, 10_000)
        firsts.append(next(t for t in labels if t != lm_data.IGNORE))
    if len(set(firsts)) < len(firsts):
        log.warning("label names %s start with the same token: no label accuracy is computed", names)
        return None
    return firsts


def _sft_stats(spark, path: str, max_length: int) -> dict:
    from pyspark.sql import functions as F

    row = spark.read.parquet(path).agg(
        F.avg("length").alias("mean"), F.avg((F.col("length") >= max_length).cast("double")).alias("trunc"),
        F.sum(F.size(F.filter("labels", lambda x: x != -100))).alias("response_tokens"),
        F.sum("length").alias("tokens"),
    ).first()
    return {"mean_tokens_per_row": round(float(row["mean"] or 0), 1),
            "truncated_share": round(float(row["trunc"] or 0), 4),
            "train_tokens": int(row["tokens"] or 0), "train_response_tokens": int(row["response_tokens"] or 0)}


def metrics(result: dict) -> dict:
    """The final figures of an LM run: before/after loss and perplexity, label scores, speed, memory."""
    first, last = result["epochs"][0], result["epochs"][-1]
    out = {
        "task_metrics": "lm",
        "eval_loss": last["eval_loss"], "eval_perplexity": last["eval_perplexity"],
        "eval_loss_before": first["eval_loss"], "eval_perplexity_before": first["eval_perplexity"],
        "train_steps": result["steps"], "train_tokens_per_second": result["tokens_per_second"],
        "train_padding_share": result["padding_share"], "train_precision": result["precision"],
        "train_device": result["device"], "train_tf32": result["tf32"],
        "train_mfu": result["mfu"], "train_matmul_peak_gflops": result["matmul_peak_gflops"],
        "parameters": result["parameters"], "trainable_parameters": result["trainable_parameters"],
        "trainable_percent": 100 * result["trainable_parameters"] / max(1, result["parameters"]),
        "peak_rss_mb": result.get("peak_rss_mb"),
    }
    for key in ("eval_accuracy", "eval_precision", "eval_recall", "eval_f1"):
        if key in last:
            out[key[5:]] = last[key]
            out[key[5:] + "_before"] = first[key]
    return out


def write_outputs(folder: str, cfg: Config, m: dict, result: dict) -> None:
    from spark_tuning.evaluate import metrics as evaluate

    epochs = [{k: v for k, v in e.items() if k != "samples"} for e in result["epochs"]]
    samples = [{"epoch": e["epoch"], **s} for e in result["epochs"] for s in e.get("samples", [])]
    adapter = os.path.join(folder, "adapter")
    if os.path.isdir(adapter):
        m["adapter_bytes"] = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))
        m["model_bytes"] = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                               if f.endswith(".safetensors"))
        m["adapter_share_of_model"] = m["adapter_bytes"] / max(1, m["model_bytes"])
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({**m, "epochs": epochs, "samples": samples}, f, indent=2)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    if result["history"]:
        evaluate.plot_curves(result["history"], os.path.join(folder, "training_curves.png"))
