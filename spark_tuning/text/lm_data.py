"""Data for the language-model tasks (`causal_lm`, `sft`) in Spark.

Both tasks end in the same staged rows as classification, plus a per-token `labels` array:
- `causal_lm`: texts are tokenized, joined with EOS and **packed** into `block_size` blocks inside each
  Spark partition (an iterator `mapInPandas`), so no token is padding; labels are the inputs. The tokens
  after a partition's last full block (fewer than `block_size`) are dropped: they cannot fill a block
  without padding, and carrying them across partitions would serialise the stage. The data stage logs
  how many tokens that drops.
- `sft`: every row becomes a chat (`messages`: a list of {role, content}); the prompt is every message
  but the last, the response is the last (an assistant message). Rendered with the tokenizer's chat
  template where it has one (`data.chat_template`), else as plain `role: content` lines. Prompt and
  response are tokenized separately and concatenated, so the boundary is exact: labels are -100 on every
  prompt token and the token ids on every response token. SmolLM2 pads with its EOS, so labels never come
  from pad ids. Classification data (text + label) can be cast as SFT: prompt = `data.sft_prompt` with
  the review, response = the label's name.

Truncation (sft): a response longer than half of `max_length` is cut at its end; a prompt that does not
fit is cut in its middle, keeping its first third (system prompt, instruction) and its end (the end of
the review and the template's assistant header), so the part the answer depends on survives.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, TYPE_CHECKING

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_tuning.errors import InputError

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import Config, DataConfig, ModelConfig

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MESSAGES = "messages"
MESSAGES_TYPE = "array<struct<role:string,content:string>>"
LM_SCHEMA = "input_ids array<int>, labels array<int>, length int"
IGNORE = -100  # label of tokens that carry no loss (PyTorch's cross-entropy ignore_index)


@dataclass(frozen=True)
class LmPrepared:
    train: DataFrame  # causal_lm: `text`; sft: `text` (for display), `messages`, `label` (class id or -1)
    eval: DataFrame
    label_names: Optional[tuple[str, ...]]  # sft on classification data: the class names
    counts: dict[str, int]


# ----------------------------------------------------------------------------------------------------
# Rows -> chats (pure transforms)


# The sft data format of labelled rows (text + label), rendered as prompt = text, response = label name.
# It is a data format, not the classification task: the task stays sft.
LABELLED_ROWS = "classification"


def sft_format(cfg: DataConfig, columns: Sequence[str]) -> str:
    """Which kind of SFT data this is; 'auto' picks by the columns present."""
    if cfg.sft_format != "auto":
        return cfg.sft_format
    if cfg.messages_column in columns:
        return "messages"
    if cfg.prompt_column in columns and cfg.response_column in columns:
        return "prompt_response"
    if cfg.text_column in columns and cfg.label_column in columns:
        return LABELLED_ROWS
    raise InputError(
        f"task sft: the data has none of a {cfg.messages_column!r} column (data.messages_column), "
        f"{cfg.prompt_column!r} + {cfg.response_column!r} columns (data.prompt_column / data.response_column), "
        f"or {cfg.text_column!r} + {cfg.label_column!r} (classification data); it has {list(columns)}: "
        "name the columns in data:"
    )


def messages_column(df: DataFrame, column: str) -> F.Column:
    """The chat column as array<struct<role, content>>; JSON strings are parsed (a row that is not a
    list of objects becomes null, and `find_bad_chats` names it)."""
    if column not in df.columns:
        raise InputError(f"data.messages_column = {column!r}: no such column; the data has {df.columns}")
    dtype = df.schema[column].dataType
    if isinstance(dtype, T.StringType):
        return F.from_json(F.col(column), MESSAGES_TYPE)
    if isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, T.StructType):
        names = set(dtype.elementType.fieldNames())
        if {"role", "content"} <= names:
            return F.transform(F.col(column), lambda m: F.struct(
                m["role"].cast("string").alias("role"), m["content"].cast("string").alias("content")))
    raise InputError(
        f"data.messages_column = {column!r} holds {dtype.simpleString()}, not a list of {{role, content}} "
        "objects: each value must look like [{\"role\": \"user\", \"content\": \"...\"}, "
        "{\"role\": \"assistant\", \"content\": \"...\"}]"
    )


def to_chats(df: DataFrame, cfg: DataConfig, fmt: str, label_names: Optional[Sequence[str]] = None) -> DataFrame:
    """Any SFT source -> `messages` (array<struct<role, content>>), `label` (class id, or -1), and `text`
    (a printable form, also the split key)."""
    if fmt == "messages":
        out = df.select(messages_column(df, cfg.messages_column).alias(MESSAGES), F.lit(-1).alias("label"))
    elif fmt == "prompt_response":
        missing = [c for c in (cfg.prompt_column, cfg.response_column) if c not in df.columns]
        if missing:
            raise InputError(f"data.prompt_column / data.response_column: no column {missing}; the data has {df.columns}")
        out = df.select(F.array(
            F.struct(F.lit("user").alias("role"), F.col(cfg.prompt_column).cast("string").alias("content")),
            F.struct(F.lit("assistant").alias("role"), F.col(cfg.response_column).cast("string").alias("content")),
        ).alias(MESSAGES), F.lit(-1).alias("label"))
    elif fmt == LABELLED_ROWS:
        # `df` is the classification stage's output: `text` and an integer `label`.
        names = F.array(*[F.lit(n) for n in label_names or ()])
        before, _, after = cfg.sft_prompt.partition("{text}")
        prompt = F.concat(F.lit(before), F.col("text"), F.lit(after))
        out = df.select(F.array(
            F.struct(F.lit("user").alias("role"), prompt.alias("content")),
            F.struct(F.lit("assistant").alias("role"), F.element_at(names, F.col("label") + 1).alias("content")),
        ).alias(MESSAGES), F.col("label").cast("int").alias("label"))
    else:
        raise InputError(f"data.sft_format = {fmt!r} is not one of messages, prompt_response, classification")
    return out.withColumn("text", F.to_json(F.col(MESSAGES)))


def chat_problem(messages: F.Column) -> F.Column:
    """Why a chat is unusable, or null when it is fine."""
    bad_role = F.filter(messages, lambda m: ~m["role"].isin(*ROLES))
    last = F.element_at(messages, -1)
    return (
        F.when(messages.isNull(), F.lit("is not a list of {role, content} objects"))
        .when(F.size(messages) == 0, F.lit("is an empty list of messages"))
        .when(F.exists(messages, lambda m: m.isNull() | m["role"].isNull() | m["content"].isNull()),
              F.lit("has a message that is not a {role, content} object with text in both"))
        .when(F.size(bad_role) > 0, F.concat(F.lit("has the unknown role "), F.to_json(F.struct(bad_role[0]["role"].alias("role"))),
                                             F.lit(f" (roles are {', '.join(ROLES)})")))
        .when(last["role"] != "assistant", F.lit("does not end with an assistant message (the response to learn)"))
        .when(F.length(F.trim(last["content"])) == 0, F.lit("has an empty response (the last, assistant message)"))
        .when(F.size(messages) < 2, F.lit("has no prompt before the response"))
    )


def find_bad_chats(df: DataFrame, setting: str) -> None:
    """Raise an InputError naming the first unusable row (0-based, in the source's order) and how many
    there are. The row number is computed only when there is a bad row."""
    flagged = df.withColumn("_problem", chat_problem(F.col(MESSAGES)))
    bad = flagged.where(F.col("_problem").isNotNull())
    n_bad = bad.count()
    if n_bad == 0:
        return
    index, row = flagged.select("_problem", MESSAGES).rdd.zipWithIndex() \
        .filter(lambda pair: pair[0]["_problem"] is not None).map(lambda pair: (pair[1], pair[0])).first()
    shown = str(row[MESSAGES])[:160] if row[MESSAGES] is not None else "a value that is not a list of objects"
    raise InputError(
        f"{setting}: row {index} {row['_problem']} ({n_bad} bad row(s) in all); it holds {shown}: every row "
        "needs a list like [{\"role\": \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}]"
    )


# ----------------------------------------------------------------------------------------------------
# The whole LM data stage (before tokenization)


def prepare_chats(spark: SparkSession, cfg: Config) -> LmPrepared:
    """Source -> checked, split and sampled chats for sft (from messages, prompt/response pairs, or
    classification rows cast as prompt = text, response = label name)."""
    from spark_tuning.data import dataset

    d = cfg.data
    raw, _ = dataset.read_source(spark, d.source, d.format, d.train_split, version=d.version)
    fmt = sft_format(d, raw.columns)
    if fmt == LABELLED_ROWS:
        prepared = dataset.prepare(spark, d, cfg.seed)
        names = prepared.labels.names
        train = to_chats(prepared.train, d, fmt, names)
        evaluation = to_chats(prepared.eval, d, fmt, names)
        return LmPrepared(train.cache(), evaluation.cache(), tuple(names), prepared.counts)
    df = to_chats(raw, d, fmt)
    find_bad_chats(df, _setting(d, fmt))
    eval_df = None
    if d.eval_source or d.eval_split:
        raw_eval, _ = dataset.read_source(spark, d.eval_source or d.source, d.format, d.eval_split)
        eval_df = to_chats(raw_eval, d, fmt)
        find_bad_chats(eval_df, _setting(d, fmt) + " (validation data)")
    return _split_and_sample(df, eval_df, cfg)


def prepare_texts(spark: SparkSession, cfg: Config) -> LmPrepared:
    """Source -> split and sampled texts for causal_lm."""
    from spark_tuning.data import dataset

    d = cfg.data
    raw, _ = dataset.read_source(spark, d.source, d.format, d.train_split, version=d.version)
    eval_df = None
    if d.eval_source or d.eval_split:
        raw_eval, _ = dataset.read_source(spark, d.eval_source or d.source, d.format, d.eval_split)
        eval_df = _texts(raw_eval, d.text_column)
    return _split_and_sample(_texts(raw, d.text_column), eval_df, cfg)


def _split_and_sample(df: DataFrame, eval_df: Optional[DataFrame], cfg: Config) -> LmPrepared:
    from spark_tuning.data import dataset

    d = cfg.data
    if eval_df is None:
        train, evaluation = dataset.split(df, d.validation_fraction, cfg.seed)
    else:
        train, evaluation = df, eval_df
    train = dataset.sample(train, d.train_limit, cfg.seed).cache()
    evaluation = dataset.sample(evaluation, d.eval_limit, cfg.seed).cache()
    counts = {"train_rows": train.count(), "eval_rows": evaluation.count()}
    if not counts["train_rows"] or not counts["eval_rows"]:
        raise InputError(f"after the split, train has {counts['train_rows']} rows and validation "
                         f"{counts['eval_rows']}: both need rows; use more data or change data.validation_fraction")
    return LmPrepared(train, evaluation, None, counts)


def _setting(d: DataConfig, fmt: str) -> str:
    return f"data.messages_column = {d.messages_column!r}" if fmt == "messages" else \
        f"data.prompt_column / data.response_column = {d.prompt_column!r} / {d.response_column!r}"


def _texts(df: DataFrame, column: str) -> DataFrame:
    from spark_tuning.data import dataset

    if column not in df.columns:
        raise InputError(f"data.text_column = {column!r}: no such column in the data; it has {df.columns}")
    out = df.select(F.col(column).cast("string").alias("text"), F.lit(0).alias("label"))
    return dataset.clean(out)


# ----------------------------------------------------------------------------------------------------
# Chat templates and rendering (pure Python; runs inside the tokenizing UDF)


def use_chat_template(tokenizer, mode: str, model_name: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "require" and not has:
        raise InputError(
            f"data.chat_template = require, but the tokenizer of {model_name} has no chat template: set "
            "data.chat_template: none (plain 'role: content' lines) or use a model that ships one"
        )
    return has and mode != "none"


def render(tokenizer, messages: Sequence[dict], with_template: bool) -> tuple[str, str]:
    """(prompt text, response text): the prompt ends where the model starts answering."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if with_template:
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise InputError("the tokenizer's chat template renders a conversation differently from its prompt: "
                             "set data.chat_template: none")
        return prompt, full[len(prompt):]
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant: "
    return prompt, msgs[-1]["content"] + (tokenizer.eos_token or "")


def encode_chat(tokenizer, messages: Sequence[dict], with_template: bool, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one chat: labels are -100 on the prompt, the ids on the response."""
    prompt, response = render(tokenizer, messages, with_template)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    p, r = truncate_pair(p, r, max_length)
    return p + r, [IGNORE] * len(p) + r


def truncate_pair(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response into max_length: cut the response's end beyond half the budget, then the
    prompt's middle (keeping its first third and its end)."""
    response = response[:max(1, max_length - min(len(prompt), max_length // 2))]
    budget = max_length - len(response)
    if len(prompt) > budget:
        head = budget // 3
        prompt = prompt[:head] + prompt[len(prompt) - (budget - head):]
    return prompt, response


# ----------------------------------------------------------------------------------------------------
# Tokenizing and packing in Spark


def tokenize_chats(df: DataFrame, src, model_cfg: ModelConfig, max_length: int, with_template: bool) -> DataFrame:
    """`messages` -> `input_ids`, `labels` (-100 on the prompt), `length`, plus the other columns."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(LM_SCHEMA)
    def encode(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from spark_tuning.model.sources import load_tokenizer

        tok = load_tokenizer(src, model_cfg)
        for chats in batches:
            pairs = [encode_chat(tok, _as_dicts(c), with_template, max_length) for c in chats]
            yield pd.DataFrame({
                "input_ids": [np.asarray(i, dtype=np.int32) for i, _ in pairs],
                "labels": [np.asarray(l, dtype=np.int32) for _, l in pairs],
                "length": np.fromiter((len(i) for i, _ in pairs), dtype=np.int32, count=len(pairs)),
            })

    out = df.withColumn("_tok", encode(F.col(MESSAGES)))
    return out.select(*[c for c in df.columns if c != MESSAGES], "_tok.input_ids", "_tok.labels", "_tok.length")


def _as_dicts(chat: Any) -> list[dict]:
    # Arrow hands a list<struct> column to pandas as arrays of dicts.
    return [dict(m) for m in chat]


def tokenize_texts(df: DataFrame, src, model_cfg: ModelConfig) -> DataFrame:
    """`text` -> `input_ids`: the whole text, EOS appended (the separator when texts are packed).

    Through the model tokenizer's Rust backend alone where it reproduces the tokenizer (tokenize.py),
    else through transformers in every task."""
    from pyspark.sql.functions import pandas_udf

    from spark_tuning.model.sources import load_tokenizer
    from spark_tuning.text.tokenize import rust_encoder

    eos_id = load_tokenizer(src, model_cfg).eos_token_id
    eos = [eos_id] if eos_id is not None else []
    enc = rust_encoder(src, model_cfg, max_length=None)
    if enc is not None:
        return df.select("text").mapInArrow(_rust_texts(enc, eos), "input_ids array<int>")

    @pandas_udf("array<int>")
    def encode(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tok = load_tokenizer(src, model_cfg)
        for texts in batches:
            ids = tok(texts.tolist(), add_special_tokens=True, truncation=False)["input_ids"]
            yield pd.Series([np.asarray(x + eos, dtype=np.int32) for x in ids])

    return df.select(encode(F.col("text")).alias("input_ids"))


def _rust_texts(enc, eos: list[int]):
    """mapInArrow function: record batches of `text` -> batches of `input_ids` (EOS appended)."""

    def encode(batches):
        import pyarrow as pa

        from spark_tuning.text.rust_tokenizer import arrow_ids, encode_flat

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tok = enc.load()
        for batch in batches:
            texts = batch.column(0).fill_null("").to_pylist()
            yield pa.RecordBatch.from_arrays([arrow_ids(*encode_flat(tok, texts, append=eos))], names=["input_ids"])

    return encode


def pack(df: DataFrame, block_size: int) -> DataFrame:
    """`input_ids` of consecutive rows -> blocks of exactly `block_size` tokens, within each partition.
    Labels are the inputs. The last tokens of a partition (fewer than block_size) are dropped. Works on
    the flat Arrow values of each batch: no Python list per row."""

    def blocks(batches):
        import pyarrow as pa

        from spark_tuning.text.tokenize import arrow_ids

        carry = np.zeros(0, dtype=np.int32)
        for batch in batches:
            ids = batch.column(0)
            flat = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            flat = np.concatenate([carry, flat])
            n = len(flat) // block_size
            carry = flat[n * block_size:]
            if n:
                offsets = np.arange(0, n * block_size + 1, block_size, dtype=np.int32)
                cut = arrow_ids(offsets, flat[:n * block_size])
                yield pa.RecordBatch.from_arrays(
                    [cut, cut, pa.array(np.full(n, block_size, dtype=np.int32))],
                    names=["input_ids", "labels", "length"])

    return df.select("input_ids").mapInArrow(blocks, LM_SCHEMA)


def token_count(df: DataFrame) -> int:
    return int(df.agg(F.sum(F.size("input_ids"))).first()[0] or 0)
