"""Supervised fine-tuning on chats: the loss counts the assistant's tokens only. Data is a messages
column, prompt/response columns, or classification rows cast as prompt = data.sft_prompt with the text,
response = the label's name (then evaluation also scores labels, and so does the served model). Chats are
rendered with the tokenizer's chat template where it has one (data.chat_template)."""

from __future__ import annotations

import logging
import os
from typing import Optional

from spark_tuning.tasks.base import Staged
from spark_tuning.tasks.lm import LanguageModelTask

log = logging.getLogger("spark_tuning")


class SFT(LanguageModelTask):
    name = "sft"
    # sft on classification data also scores the answered label names
    eval_metrics = ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1")

    def check_model(self, cfg, src, tokenizer, model_config) -> dict:
        from spark_tuning.text import lm_data

        info = super().check_model(cfg, src, tokenizer, model_config)
        info["chat_template"] = lm_data.use_chat_template(tokenizer, cfg.data.chat_template, src.location)
        return info

    def stage(self, spark, cfg, src, info: dict, staging: str) -> Staged:
        from spark_tuning.loader.staging import stage as write_stage
        from spark_tuning.text import lm_data

        prepared = lm_data.prepare_chats(spark, cfg)
        template, n_files, max_len = bool(info.get("chat_template")), 2 * cfg.distributed.num_processes, cfg.data.max_length
        train_ref = write_stage(lm_data.tokenize_chats(prepared.train, src, cfg.model, max_len, template).drop("text"),
                                os.path.join(staging, "train"), n_files)
        eval_ref = write_stage(lm_data.tokenize_chats(prepared.eval, src, cfg.model, max_len, template),
                               os.path.join(staging, "eval"), n_files)
        figures = {**prepared.counts, **_stats(spark, train_ref.path, max_len), **info}
        extras: dict = {"chat_template": template}
        id2label: dict = {}
        if prepared.label_names:
            names = list(prepared.label_names)
            id2label = dict(enumerate(names))
            extras.update(sft_classification=True, label_names=names,
                          label_first_tokens=label_first_tokens(src, cfg, names, template))
        return Staged(train_ref, eval_ref, figures, extras, id2label, frames=[prepared.train, prepared.eval])

    def profile_rows(self, spark, cfg, src, info: dict):
        """Chats' whole lengths as training renders them (prompt + response, nothing cut)."""
        from spark_tuning.tasks.base import Profiled
        from spark_tuning.text import lm_data

        prepared = lm_data.prepare_chats(spark, cfg)
        template, whole = bool(info.get("chat_template")), 1 << 30  # a budget no chat reaches: nothing is cut
        train, evaluation = (lm_data.tokenize_chats(df, src, cfg.model, whole, template).select("length")
                             for df in (prepared.train, prepared.eval))
        labels = {}
        if prepared.label_names:
            from spark_tuning.tasks.classification import class_counts

            names = prepared.label_names
            labels = {split: {names[k]: n for k, n in class_counts(df).items() if k >= 0}
                      for split, df in (("train", prepared.train), ("validation", prepared.eval))}
        return Profiled(train, evaluation, dict(prepared.counts), labels, cfg.data.max_length,
                        frames=[prepared.train, prepared.eval])

    def prompt_ids(self, tokenizer, prompt: str, cfg, extras: dict) -> list[int]:
        """The prompt rendered and cut as training cut prompts (lm_data.truncate_pair), leaving room for
        sample_max_new_tokens; the served model (serving_model.TextGenerator) does the same."""
        from spark_tuning.text.lm_data import render, truncate_pair

        if extras.get("sft_classification"):
            prompt = cfg.data.sft_prompt.replace("{text}", prompt)
        text, _ = render(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": "-"}],
                         extras.get("chat_template", False))
        return truncate_pair(tokenizer(text, add_special_tokens=False)["input_ids"],
                             [0] * cfg.train.sample_max_new_tokens, cfg.data.max_length)[0]

    def serving_config(self, cfg, extras: dict, folder: str) -> dict:
        out = {**super().serving_config(cfg, extras, folder), "chat_template": bool(extras.get("chat_template"))}
        if extras.get("sft_classification"):
            out["prompt_template"] = cfg.data.sft_prompt
        if extras.get("label_first_tokens"):
            out.update(label_names=list(extras["label_names"]), label_first_tokens=list(extras["label_first_tokens"]))
        return out


def label_first_tokens(src, cfg, names: list[str], with_template: bool) -> Optional[list[int]]:
    """The first response token of each label name, as the model sees it after the prompt. None (no
    label accuracy, with a warning) when two labels start with the same token."""
    from spark_tuning.model.sources import load_tokenizer
    from spark_tuning.text import lm_data

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


def _stats(spark, path: str, max_length: int) -> dict:
    from pyspark.sql import functions as F

    row = spark.read.parquet(path).agg(
        F.avg("length").alias("mean"), F.avg((F.col("length") >= max_length).cast("double")).alias("trunc"),
        F.sum(F.size(F.filter("labels", lambda x: x != -100))).alias("response_tokens"),
        F.sum("length").alias("tokens"),
    ).first()
    return {"mean_tokens_per_row": round(float(row["mean"] or 0), 1),
            "truncated_share": round(float(row["trunc"] or 0), 4),
            "train_tokens": int(row["tokens"] or 0), "train_response_tokens": int(row["response_tokens"] or 0)}


TASK = SFT()
