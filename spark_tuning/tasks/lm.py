"""What causal_lm and sft share: a causal-LM head, evaluation by loss and perplexity over the tokens that
carry labels (sft: the response tokens only), greedy samples of `train.sample_prompts`, and the outputs.

For sft on classification data, evaluation also scores labels: the predicted label is the one whose first
response token the model scores highest at the answer position (the tokens that tell the labels apart;
from the same forward pass as the loss, so it costs nothing extra). The label names' first tokens must
differ; the data stage checks that.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np

from spark_tuning.errors import InputError
from spark_tuning.tasks.base import LABEL_OUTPUTS, Staged, Task

log = logging.getLogger("spark_tuning.train")

LOGITS_BUDGET = 2 ** 28  # floats of logits per evaluation batch (1 GiB in fp32)


def eval_rows_per_batch(cfg, vocab_size: int, width: int) -> int:
    return max(1, min(cfg.train.eval_batch_size, LOGITS_BUDGET // max(1, width * vocab_size)))


def evaluate_shard(model, shard, plan, pad_id: int, device: str, precision: str,
                   first_tokens: Optional[list[int]]) -> dict[str, Any]:
    """Loss sums over labelled tokens, and label predictions where rows have a class label."""
    import torch
    import torch.nn.functional as F

    from spark_tuning.loader.batches import iterate
    from spark_tuning.train.feed import to_device
    from spark_tuning.train.precision import autocast

    model.eval()
    nll, count, row_ids, preds, labels = 0.0, 0, [], [], []
    with torch.inference_mode(), autocast(precision, device):
        for index, batch in iterate(shard, plan, pad_id):
            inputs = to_device({k: v for k, v in batch.items() if k != "labels"}, device)
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


def label_scores(parts: list[dict], names: list[str]) -> tuple[dict, dict]:
    """Label accuracy / precision / recall / F1 from every rank's predictions, and the rows in id order."""
    from spark_tuning.evaluate.metrics import classification_metrics

    have = [p for p in parts if "preds" in p]
    row_ids, preds, labels = (np.concatenate([p[k] for p in have]) for k in ("row_ids", "preds", "labels"))
    m = classification_metrics(preds, labels, names)
    order = np.argsort(row_ids)
    rec = {"eval_accuracy": m["accuracy"], "eval_precision": m["precision"], "eval_recall": m["recall"],
           "eval_f1": m["f1"]}
    return rec, {"row_ids": row_ids[order].tolist(), "preds": preds[order].tolist(), "labels": labels[order].tolist()}


class LanguageModelTask(Task):
    eval_metrics = ("eval_loss", "eval_perplexity")
    auto_model = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    generates_text = True
    eval_before_training = True
    verifiable = False

    def config_problems(self, cfg) -> list[str]:
        p = self.petastorm_problems(cfg)
        if cfg.deploy.verify:
            p.append(f"deploy.verify = true checks a served model's labels and probabilities against the run's "
                     f"offline predictions, which a {self.name} run does not make (its model is still logged and "
                     "servable): set deploy.verify: false")
        return p

    def check_model(self, cfg, src, tokenizer, model_config) -> dict:
        from spark_tuning.model.llm import context_length

        limit, key = context_length(model_config), self.length_key
        if limit and self.sequence_length(cfg) > limit:
            raise InputError(f"data.{key} = {self.sequence_length(cfg)} is above the context length of "
                               f"{src.location} ({limit} tokens): set data.{key} to at most {limit}")
        if tokenizer.eos_token_id is None:
            raise InputError(f"the tokenizer of {src.location} has no EOS token, which {self.name} needs to end texts")
        return {"context_length": limit}

    def load_model(self, cfg, src, tokenizer, id2label: dict, device: str, dtype):
        from spark_tuning.model.llm import build_causal_lm

        return build_causal_lm(src, cfg.model, tokenizer.pad_token_id, device, dtype)

    def evaluate(self, model, shard, cfg, extras: dict, tokenizer, ctx, precision: str, step: int, tracker,
                 id2label: dict) -> tuple[dict, dict]:
        """One evaluation on every rank; (the record, per-row label predictions where scored) on every rank."""
        from spark_tuning.loader.batches import plan_eval_batches
        from spark_tuning.train import distributed

        plain = distributed.unwrap(model)
        width = int(shard.lengths.max()) if len(shard) else 1
        rows = eval_rows_per_batch(cfg, plain.config.vocab_size if hasattr(plain, "config") else 50_000, width)
        first_tokens = extras.get("label_first_tokens")
        local = evaluate_shard(model, shard, plan_eval_batches(shard, rows), tokenizer.pad_token_id, ctx.device,
                               precision, first_tokens)
        parts = distributed.gather(local, ctx)
        tokens = sum(p["tokens"] for p in parts)
        loss = sum(p["nll"] for p in parts) / max(1, tokens)
        rec = {"step": step, "eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50))), "eval_tokens": tokens}
        eval_out: dict = {}
        if first_tokens and any("preds" in p for p in parts):
            scores, eval_out = label_scores(parts, extras["label_names"])
            rec.update(scores)
        # Rank 0's samples; a sharded model's ranks all generate them (calls into a peft model's inner modules
        # on one rank alone left FSDP's state out of step with the other ranks': the next step hung).
        samples = self.generate_samples(plain, tokenizer, cfg, extras, ctx.device) if ctx.is_rank_zero or ctx.sharded else []
        if ctx.is_rank_zero:
            if samples:
                rec["samples"] = samples
                tracker.table({"step": [step] * len(samples), "prompt": [s["prompt"] for s in samples],
                               "generated": [s["generated"] for s in samples]}, f"samples/step_{step:06d}.json")
        return rec, eval_out

    def generate_samples(self, model, tokenizer, cfg, extras: dict, device: str) -> list[dict]:
        """Greedy continuations of the configured prompts (a few short generations). synced_gpus=False: for a
        sharded model transformers would otherwise step every rank's generation together, token by token."""
        import torch

        out = []
        model.eval()
        with torch.inference_mode():
            for prompt in cfg.train.sample_prompts:
                ids = torch.tensor([self.prompt_ids(tokenizer, prompt, cfg, extras)], device=device)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=cfg.train.sample_max_new_tokens, synced_gpus=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                out.append({"prompt": prompt, "generated": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
        return out

    def metrics(self, result: dict, staged: Staged) -> dict:
        """Before/after loss and perplexity, label scores where the data had labels, model size, memory."""
        first, last = result["epochs"][0], result["epochs"][-1]
        out = {"task_metrics": "lm", "eval_loss": last["eval_loss"], "eval_perplexity": last["eval_perplexity"],
               "eval_loss_before": first["eval_loss"], "eval_perplexity_before": first["eval_perplexity"],
               "parameters": result["parameters"], "trainable_parameters": result["trainable_parameters"],
               "trainable_percent": 100 * result["trainable_parameters"] / max(1, result["parameters"]),
               "peak_rss_mb": result.get("peak_rss_mb")}
        for key in ("eval_accuracy", "eval_precision", "eval_recall", "eval_f1"):
            if key in last:
                out[key[5:]] = last[key]
                out[key[5:] + "_before"] = first[key]
        return out

    def write_outputs(self, folder: str, cfg, metrics: dict, result: dict, staged: Staged) -> None:
        adapter = os.path.join(folder, "adapter")
        if os.path.isdir(adapter):
            metrics["adapter_bytes"] = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))
            metrics["model_bytes"] = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                                         if f.endswith(".safetensors"))
            metrics["adapter_share_of_model"] = metrics["adapter_bytes"] / max(1, metrics["model_bytes"])

    def metrics_file_extras(self, result: dict) -> dict:
        epochs = [{k: v for k, v in e.items() if k != "samples"} for e in result["epochs"]]
        samples = [{"epoch": e["epoch"], **s} for e in result["epochs"] for s in e.get("samples", [])]
        return {"epochs": epochs, "samples": samples}

    def summary_rows(self, metrics: dict) -> list[tuple[str, str]]:
        """Before -> after figures of the response (or all) tokens."""
        m = metrics
        rows = [("eval loss (before -> after)", f"{m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}"),
                ("perplexity (before -> after)", f"{m['eval_perplexity_before']:.2f} -> {m['eval_perplexity']:.2f}")]
        for key in ("accuracy", "precision", "recall", "f1"):
            if key in m:
                rows.append((f"label {key} (before -> after)", f"{m[key + '_before']:.4f} -> {m[key]:.4f}"))
        rows.append(("trainable parameters", f"{m['trainable_parameters']:,} of {m['parameters']:,} "
                                             f"({m['trainable_percent']:.2f}%)"))
        if m.get("adapter_bytes"):
            rows.append(("adapter size", f"{m['adapter_bytes'] / 2**20:.1f} MiB "
                                         f"({100 * m['adapter_share_of_model']:.2f}% of the merged model)"))
        if m.get("peak_rss_mb"):
            rows.append(("peak memory (RSS, one process)", f"{m['peak_rss_mb']:.0f} MiB"))
        return rows

    def serving_config(self, cfg, extras: dict, folder: str) -> dict:
        return {"max_new_tokens": cfg.train.sample_max_new_tokens}

    def output_columns(self, serving: dict) -> list[tuple[str, str]]:
        """Generated text; label columns too where it learnt labels (sft on labelled rows)."""
        return [("generated_text", "string"), *(LABEL_OUTPUTS if "label_names" in serving else ())]

    def input_examples(self, cfg, folder: str) -> list[str]:
        return list(cfg.train.sample_prompts[:2])  # the prompts the run generated samples for
