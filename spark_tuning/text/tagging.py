"""Tokenize tagged rows in Spark (task token_classification): one source row -> one row per window.

A pandas UDF runs text/token_spans.encode with the model's Rust tokenizer (rebuilt once per Python worker
from the JSON the driver took from the loaded tokenizer, as text/tokenize.py does) and returns each row's
windows, which `explode` turns into rows: `doc_id` (the source row), `window`, `input_ids`, `length`,
`labels` (per token, -100 where no loss is taken), `units` (the unit each owned first token stands for) and
`unit_spans` (every unit's start and end character, one after another).
"""

from __future__ import annotations

import functools
import os
from typing import Iterator, Tuple

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

WINDOWS_SCHEMA = ("array<struct<input_ids:array<int>, labels:array<int>, length:int, units:array<int>, "
                  "unit_spans:array<int>>>")


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str):
    from spark_tuning.text.token_spans import plain_tokenizer

    return plain_tokenizer(tokenizer_json)


def backend_json(src, model_cfg) -> str:
    """The fast tokenizer's Rust backend as transformers configured it (special tokens included)."""
    from spark_tuning.errors import InputError
    from spark_tuning.model.sources import load_tokenizer

    tok = load_tokenizer(src, model_cfg)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"model.source = {src.location!r} has no fast tokenizer ({type(tok).__name__}): task "
                         "token_classification needs its character offsets; use a model with a tokenizer.json")
    return backend.to_str()


def tag_windows(df: DataFrame, tokenizer_json: str, unit: str, max_length: int, stride: int,
                label_all: bool) -> DataFrame:
    """`text` + `gold` (data/tagged.py) -> one row per window (see the module), other columns kept."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(WINDOWS_SCHEMA)
    def encode(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        from spark_tuning.text import token_spans

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tok = _tokenizer(tokenizer_json)
        for texts, golds in batches:
            out = []
            for text, gold in zip(texts.fillna(""), golds):
                gold = [] if gold is None else list(gold)
                if unit == "word":
                    spans, wins = token_spans.encode(tok, text, unit, max_length, stride, label_all, unit_tags=gold)
                else:
                    triples = [tuple(gold[i:i + 3]) for i in range(0, len(gold), 3)]
                    spans, wins = token_spans.encode(tok, text, unit, max_length, stride, label_all,
                                                     entity_spans=triples)
                flat = [x for span in spans for x in span]
                out.append([{"input_ids": w["input_ids"], "labels": w["labels"], "length": len(w["input_ids"]),
                             "units": w["units"], "unit_spans": flat} for w in wins])
            yield pd.Series(out)

    cols = [c for c in df.columns if c != "gold"]
    windows = df.withColumn("doc_id", F.monotonically_increasing_id()).withColumn(
        "_w", encode(F.col("text"), F.col("gold")))
    return windows.select(*cols, "doc_id", F.posexplode("_w").alias("window", "_x")).select(
        *cols, "doc_id", "window", *[F.col(f"_x.{c}").alias(c) for c in ("input_ids", "labels", "length", "units",
                                                                          "unit_spans")])
