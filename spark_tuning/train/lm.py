"""The task-specific parts of training, called from train.train_fn: building the model for a task (with
LoRA and gradient checkpointing), and evaluating causal_lm / sft models. No Spark inside; rank logic only
through spark_tuning.distributed.

Evaluation of causal_lm and sft: the mean loss over the tokens that carry labels (for sft, the response
tokens only) and its perplexity, exp(loss). For sft on classification data, also label accuracy /
precision / recall / F1: the predicted label is the one whose first response token the model scores
highest at the answer position (the tokens that tell the labels apart; computed from the same forward
pass as the loss, so it costs nothing extra). The label names' first tokens must differ; the driver
checks that. Generated samples for `train.sample_prompts` (greedy) are logged to MLflow as a table.
"""

from __future__ import annotations

import logging
import resource
from typing import Any, Optional

import numpy as np

log = logging.getLogger("spark_tuning.train")

LOGITS_BUDGET = 2 ** 28  # floats of logits per evaluation batch (1 GiB in fp32)


def build_model(cfg, src, tokenizer, id2label: dict[int, str], device: str = "cpu", dtype=None):
    """The model for cfg.task on `device`, its weights in `dtype` (None: fp32), with gradient
    checkpointing and LoRA where configured. Whatever trains is fp32: a half-precision base (LoRA) keeps
    its adapters and any new head in fp32, which the fp16 loss scaler needs and bf16 updates want."""
    import torch

    from spark_tuning.model import llm
    from spark_tuning.model import lora
    from spark_tuning.model.sources import build_classifier

    if cfg.task == "classification":
        model = build_classifier(src, cfg.model, id2label, tokenizer.pad_token_id, device, dtype)
    else:
        model = llm.build_causal_lm(src, cfg.model, tokenizer.pad_token_id, device, dtype)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = lora.apply(model, cfg.lora, cfg.task)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def export_model(model, cfg, src, tokenizer, id2label: dict[int, str]):
    """The model to save. A LoRA run whose frozen base was held in bf16/fp16 trained its adapters on that
    copy: they are put back on the base as it was published (fp32, on the CPU), so that the merged model
    equals the adapter applied to the original base. Anything else is saved as it trained."""
    import torch

    if not any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        return model
    export = build_model(cfg, src, tokenizer, id2label, "cpu", torch.float32)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = dict(export.named_parameters())
    if set(trained) - set(params):
        raise RuntimeError(f"the fp32 rebuild of the model lacks trained parameters {sorted(set(trained) - set(params))[:5]}")
    with torch.no_grad():
        for name, p in trained.items():
            params[name].copy_(p.detach().to("cpu", torch.float32))
    return export


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def eval_rows_per_batch(cfg, vocab_size: int, width: int) -> int:
    return max(1, min(cfg.train.eval_batch_size, LOGITS_BUDGET // max(1, width * vocab_size)))


def evaluate_shard(model, shard, plan, pad_id: int, device: str, precision: str,
                   first_tokens: Optional[list[int]]) -> dict[str, Any]:
    """Loss sums over labelled tokens, and label predictions where rows have a class label."""
    import torch
    import torch.nn.functional as F

    from spark_tuning.loader.batches import iterate
    from spark_tuning.train.precision import autocast

    model.eval()
    nll, count, row_ids, preds, labels = 0.0, 0, [], [], []
    with torch.inference_mode(), autocast(precision, device):
        for index, batch in iterate(shard, plan, pad_id):
            inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.float()
            target = torch.from_numpy(batch["labels"]).to(device)
            shifted, wanted = logits[:, :-1], target[:, 1:]
            nll += float(F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), wanted.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            count += int((wanted != -100).sum())
            if first_tokens:
                # The answer position: the last prompt token, whose logits predict the response's first.
                answer = (target != -100).int().argmax(dim=1) - 1
                scores = logits[torch.arange(len(index)), answer.clamp(min=0)][:, first_tokens]
                preds.append(scores.argmax(dim=1).cpu().numpy())
                labels.append(shard.labels[index])
                row_ids.append(shard.row_ids[index])
    out = {"nll": nll, "tokens": count}
    if first_tokens and preds:
        out.update(row_ids=np.concatenate(row_ids), preds=np.concatenate(preds), labels=np.concatenate(labels))
    return out


def evaluate(model, eval_shard, cfg, lm: dict, tokenizer, ctx, precision: str, epoch: int, step: int,
             tracker) -> tuple[dict, dict]:
    """One evaluation on every rank; returns (the epoch record, per-row predictions) on every rank."""
    from spark_tuning.train import distributed
    from spark_tuning.evaluate.metrics import classification_metrics
    from spark_tuning.loader.batches import plan_eval_batches

    width = int(eval_shard.lengths.max()) if len(eval_shard) else 1
    rows = eval_rows_per_batch(cfg, distributed.unwrap(model).config.vocab_size
                               if hasattr(distributed.unwrap(model), "config") else 50_000, width)
    first_tokens = lm.get("label_first_tokens")
    local = evaluate_shard(model, eval_shard, plan_eval_batches(eval_shard, rows), tokenizer.pad_token_id,
                           ctx.device, precision, first_tokens)
    parts = distributed.gather(local, ctx)
    nll, tokens = sum(p["nll"] for p in parts), sum(p["tokens"] for p in parts)
    loss = nll / max(1, tokens)
    rec = {"epoch": epoch, "step": step, "eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50))),
           "eval_tokens": tokens}
    eval_out: dict = {}
    if first_tokens and any("preds" in p for p in parts):
        row_ids = np.concatenate([p["row_ids"] for p in parts if "preds" in p])
        preds = np.concatenate([p["preds"] for p in parts if "preds" in p])
        labels = np.concatenate([p["labels"] for p in parts if "preds" in p])
        m = classification_metrics(preds, labels, lm["label_names"])
        rec.update(eval_accuracy=m["accuracy"], eval_precision=m["precision"], eval_recall=m["recall"],
                   eval_f1=m["f1"])
        order = np.argsort(row_ids)
        eval_out = {"row_ids": row_ids[order].tolist(), "preds": preds[order].tolist(),
                    "labels": labels[order].tolist()}
    tracker.metrics({k: v for k, v in rec.items() if k not in ("step", "epoch")}, step)
    if ctx.is_rank_zero:
        log.info("evaluation after epoch %d (step %d): response/token loss %.4f perplexity %.2f%s", epoch, step,
                 loss, rec["eval_perplexity"],
                 f" label accuracy {rec['eval_accuracy']:.4f} f1 {rec['eval_f1']:.4f}" if "eval_accuracy" in rec else "")
        samples = generate_samples(distributed.unwrap(model), tokenizer, cfg, lm, ctx.device)
        if samples:
            rec["samples"] = samples
            tracker.table({"step": [step] * len(samples), "prompt": [s["prompt"] for s in samples],
                           "generated": [s["generated"] for s in samples]}, f"samples/step_{step:06d}.json")
    return rec, eval_out


def sample_prompt_ids(tokenizer, prompt: str, cfg, lm: dict) -> list[int]:
    """A prompt's token ids as training shaped them, cut to leave room for sample_max_new_tokens (sft: as
    lm_data.truncate_pair cuts a prompt; causal_lm: its end is kept). The served model
    (serving_model.TextGenerator) does the same, so its answers match these samples."""
    from spark_tuning.text.lm_data import render, truncate_pair

    new = cfg.train.sample_max_new_tokens
    if cfg.task == "causal_lm":
        length = cfg.data.block_size
        return tokenizer(prompt, add_special_tokens=True)["input_ids"][-(length - min(new, length - length // 2)):]
    if lm.get("sft_classification"):
        prompt = cfg.data.sft_prompt.replace("{text}", prompt)
    text, _ = render(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": "-"}],
                     lm.get("chat_template", False))
    return truncate_pair(tokenizer(text, add_special_tokens=False)["input_ids"], [0] * new, cfg.data.max_length)[0]


def generate_samples(model, tokenizer, cfg, lm: dict, device: str) -> list[dict]:
    """Greedy continuations of the configured prompts (rank 0 only; a few short generations)."""
    import torch

    out = []
    if not cfg.train.sample_prompts:
        return out
    model.eval()
    with torch.inference_mode():
        for prompt in cfg.train.sample_prompts:
            ids = torch.tensor([sample_prompt_ids(tokenizer, prompt, cfg, lm)], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=cfg.train.sample_max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out.append({"prompt": prompt, "generated": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out
