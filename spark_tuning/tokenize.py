"""Tokenization in Spark: an iterator pandas UDF that loads the fast tokenizer once per task.

Rows are truncated to `max_length` and NOT padded: each keeps its own `input_ids` and `length`, and the
loader pads each batch only to its longest row.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from spark_tuning.config import ModelConfig
from spark_tuning.model import ModelSource

TOKENS_SCHEMA = "input_ids array<int>, length int"
# Characters kept per allowed token before tokenizing. Real tokens are far shorter, so nothing that would
# survive truncation is lost, and a 1 MB text costs no more than a long review.
CHARS_PER_TOKEN = 64


def tokenize(df: DataFrame, src: ModelSource, model_cfg: ModelConfig, max_length: int) -> DataFrame:
    """`text` -> `text`, `input_ids`, `length` (plus every other column of `df`)."""

    @pandas_udf(TOKENS_SCHEMA)
    def encode(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        # Spark already runs one task per core: the tokenizer's own thread pool would oversubscribe them.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from spark_tuning.model import load_tokenizer

        tok = load_tokenizer(src, model_cfg)  # once per task, not per batch
        for texts in batches:
            texts = texts.str.slice(0, max_length * CHARS_PER_TOKEN)
            ids = tok(texts.tolist(), truncation=True, max_length=max_length, padding=False)["input_ids"]
            yield pd.DataFrame({
                "input_ids": [np.asarray(x, dtype=np.int32) for x in ids],
                "length": np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids)),
            })

    out = df.withColumn("_tok", encode(F.col("text")))
    return out.select(*[c for c in df.columns], "_tok.input_ids", "_tok.length")
