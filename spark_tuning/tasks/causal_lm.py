"""Causal language modelling: continue text. Texts are tokenized in Spark, joined with EOS and cut into
blocks of data.block_size tokens; the loss is every next token's; evaluation reports loss and perplexity.
The served model continues a prompt (its end kept, to leave room for the new tokens)."""

from __future__ import annotations

import os

from spark_tuning.errors import InputError
from spark_tuning.tasks.base import Staged
from spark_tuning.tasks.lm import LanguageModelTask


class CausalLM(LanguageModelTask):
    name = "causal_lm"
    length_key = "block_size"
    truncates = False  # texts are packed into blocks

    def sequence_length(self, cfg) -> int:
        return cfg.data.block_size  # texts are packed into blocks of this many tokens

    def stage(self, spark, cfg, src, info: dict, staging: str) -> Staged:
        from spark_tuning.loader.staging import stage as write_stage
        from spark_tuning.text import lm_data

        prepared = lm_data.prepare_texts(spark, cfg)
        figures, parts, n_files = dict(prepared.counts), {}, 2 * cfg.distributed.num_processes
        for name, df in (("train", prepared.train), ("eval", prepared.eval)):
            ids = lm_data.tokenize_texts(df, src, cfg.model).cache()
            parts[name] = write_stage(lm_data.pack(ids, cfg.data.block_size), os.path.join(staging, name), n_files)
            total = lm_data.token_count(ids)
            figures[f"{name}_tokens"], figures[f"{name}_blocks"] = total, parts[name].num_rows
            # Partition remainders, under block_size each.
            figures[f"{name}_tokens_dropped"] = total - parts[name].num_rows * cfg.data.block_size
            ids.unpersist()
        if not parts["train"].num_rows or not parts["eval"].num_rows:
            raise InputError(
                f"data.block_size = {cfg.data.block_size}: the data fills {parts['train'].num_rows} training and "
                f"{parts['eval'].num_rows} validation blocks; both need at least one: lower data.block_size or add text")
        return Staged(parts["train"], parts["eval"], {**figures, **info}, {"chat_template": False},
                      frames=[prepared.train, prepared.eval])

    def profile_rows(self, spark, cfg, src, info: dict):
        """Texts' whole lengths (EOS included), and how well they pack: the job concatenates each partition's
        texts and cuts blocks of data.block_size, dropping each partition's remainder."""
        from pyspark.sql import functions as F

        from spark_tuning.tasks.base import Profiled
        from spark_tuning.text import lm_data

        prepared = lm_data.prepare_texts(spark, cfg)
        figures, lengths, frames = dict(prepared.counts), {}, [prepared.train, prepared.eval]
        for name, df in (("train", prepared.train), ("eval", prepared.eval)):
            ids = lm_data.tokenize_texts(df, src, cfg.model).cache()
            total, blocks = lm_data.token_count(ids), lm_data.pack(ids, cfg.data.block_size).count()
            figures.update({f"{name}_tokens": total, f"{name}_blocks": blocks,
                            f"{name}_packing_efficiency": round(blocks * cfg.data.block_size / max(1, total), 4)})
            lengths[name] = ids.select(F.size("input_ids").alias("length"))
            frames.append(ids)
        return Profiled(lengths["train"], lengths["eval"], figures, {}, None, frames=frames)

    def prompt_ids(self, tokenizer, prompt: str, cfg, extras: dict) -> list[int]:
        """The prompt's end, leaving room for sample_max_new_tokens (as the served model cuts it)."""
        length, new = cfg.data.block_size, cfg.train.sample_max_new_tokens
        return tokenizer(prompt, add_special_tokens=True)["input_ids"][-(length - min(new, length - length // 2)):]


TASK = CausalLM()
