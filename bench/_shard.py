"""IMDB reviews tokenized in-process into the loader's staged layout (Parquet files with row_id, input_ids,
length, label) and into an in-memory Shard: the training and inference benchmarks skip Spark this way,
so they time the model, the batching and the loader, not the Spark stage (benchmark 1 times that)."""

from __future__ import annotations

import os

import numpy as np

import _common as C


def tokenized(n: int, max_length: int, seed: int = 0):
    from transformers import AutoTokenizer

    df = C.imdb_rows(n, seed)
    tok = AutoTokenizer.from_pretrained(C.minilm_dir())
    ids = tok(df["text"].tolist(), truncation=True, max_length=max_length)["input_ids"]
    return df, ids, tok


def stage(path: str, ids: list, labels, num_files: int = 2):
    """Write rows the way loader.stage does (row_id, input_ids int32, length, label); returns a DataRef."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spark_tuning.loader import DataRef

    os.makedirs(path)
    n = len(ids)
    for f in range(num_files):
        rows = range(f, n, num_files)
        pq.write_table(pa.table({
            "row_id": pa.array(list(rows), pa.int64()),
            "input_ids": pa.array([ids[i] for i in rows], pa.list_(pa.int32())),
            "length": pa.array([len(ids[i]) for i in rows], pa.int32()),
            "label": pa.array([int(labels[i]) for i in rows], pa.int64()),
        }), os.path.join(path, f"part-{f:05d}.parquet"))
    return DataRef(path=path, num_rows=n)


def shard(ids: list, labels) -> "Shard":
    from spark_tuning.loader import Shard

    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])
    return Shard(row_ids=np.arange(len(ids)), labels=np.asarray(labels, dtype=np.int64), lengths=lengths,
                 offsets=offsets, values=values, rows_per_rank=[len(ids)])
