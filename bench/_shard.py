"""IMDB reviews tokenized in-process into the loader's staged layout (Parquet files with row_id, input_ids,
length, label) and into an in-memory Shard: the training and inference benchmarks skip Spark this way,
so they time the model, the batching and the loader, not the Spark stage (benchmark 1 times that)."""

from __future__ import annotations

import numpy as np

import _common as C


def tokenized(n: int, max_length: int, seed: int = 0):
    from transformers import AutoTokenizer

    df = C.imdb_rows(n, seed)
    tok = AutoTokenizer.from_pretrained(C.minilm_dir())
    ids = tok(df["text"].tolist(), truncation=True, max_length=max_length)["input_ids"]
    return df, ids, tok


def stage(path: str, ids: list, labels, num_files: int = 2):
    """Write rows the way loader.stage does; returns a DataRef."""
    from spark_tuning.loader.staging import write_staged

    return write_staged(path, ids, labels, num_files=num_files)


def shard(ids: list, labels) -> "Shard":
    from spark_tuning.loader.staging import Shard

    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])
    return Shard(row_ids=np.arange(len(ids)), labels=np.asarray(labels, dtype=np.int64), lengths=lengths,
                 offsets=offsets, values=values, rows_per_rank=[len(ids)])
