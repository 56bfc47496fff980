"""From Spark to PyTorch: stage tokenized rows as Parquet once; each rank reads only its own row groups.

Staging writes `world_size * k` similar-sized files, so row groups split evenly between ranks. A rank
reads its groups with pyarrow (only the columns it needs) and cuts them into batches that are padded to
their own longest row (batches.py).

Length buckets: staging adds a `bucket` column in Spark (`with_length_buckets`): lengths within ~10% of
each other share a bucket, so that batches.py can cut batches that pad by a few percent at most.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

TRAIN_COLUMNS = ["row_id", "input_ids", "length", "label"]
BUCKET = "bucket"  # staged by with_length_buckets; read by the Parquet loader, recomputed where absent
# causal_lm / sft rows also carry per-token labels (-100 where no loss is taken), with the same offsets.
TOKEN_LABELS = "labels"
TOKEN_TYPES = "token_type_ids"  # text pairs (BERT-style models): 0 for the first text's tokens, 1 for the pair's
IGNORE_INDEX = -100
# Bucket edges grow by this share: rows of one bucket differ in length by at most ~10%, so a batch cut
# inside a bucket pads by ~5% on average. Below 10 tokens every length is its own bucket.
BUCKET_GROWTH = 0.1
MAX_BUCKETED_LENGTH = 1 << 20  # longer rows share the last bucket


@dataclass(frozen=True)
class DataRef:
    """Where a staged split lives, and how many rows it has. Plain data: it travels to every rank."""

    path: str
    num_rows: int


def with_row_ids(df, num_files: int):
    """`num_files` partitions with each row numbered (`row_id`). Every loader backend stages through this,
    so that the same input gives the same rows, ids and file layout whichever backend reads them.

    Which file a row lands in, and where in it, depends only on the row's content: rows are hashed into
    files and sorted by the hash inside each file. A round-robin `repartition(n)` would depend on how the
    input was partitioned (which differs between local[*] and a cluster with other core counts), and so
    would the ranks' shards and the data order: the same config gives the same training anywhere."""
    from pyspark.sql import functions as F

    key = F.xxhash64(*[F.col(c) for c in df.columns])
    return (df.withColumn("_key", key).repartition(num_files, "_key").sortWithinPartitions("_key")
            .drop("_key").withColumn("row_id", F.monotonically_increasing_id()))


def bucket_edges() -> list[int]:
    """Lower edges of the length buckets: 1, 2, ..., 10, 11, 12, 13, ..., 20, 22, 24, ... (x1.1 each)."""
    edges, e = [], 1
    while e <= MAX_BUCKETED_LENGTH:
        edges.append(e)
        e = max(e + 1, int(e * (1 + BUCKET_GROWTH)))
    return edges


def with_length_buckets(df):
    """Adds `bucket`: the number of bucket edges at or below the row's `length` (0 for empty rows).

    Pure: DataFrame -> DataFrame. `length_buckets` gives the same numbers from lengths in NumPy."""
    from pyspark.sql import functions as F

    edges = F.array(*[F.lit(e) for e in bucket_edges()])
    return df.withColumn(BUCKET, F.size(F.filter(edges, lambda e: e <= F.col("length"))).cast("int"))


def length_buckets(lengths: np.ndarray) -> np.ndarray:
    """`with_length_buckets` for lengths already in memory (e.g. data staged without the column)."""
    return np.searchsorted(np.asarray(bucket_edges()), lengths, side="right").astype(np.int64)


def stage(df, path: str, num_files: int) -> DataRef:
    """Write a tokenized DataFrame once as Parquet (with a stable `row_id` and a length `bucket`) and
    describe it."""
    staged = with_row_ids(with_length_buckets(df), num_files)
    staged.write.mode("error").parquet(path)
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in _files(path))
    return DataRef(path=path, num_rows=rows)


def write_staged(path: str, input_ids: Sequence[Sequence[int]], labels: Sequence[int],
                 token_labels: Optional[Sequence[Sequence[int]]] = None, num_files: int = 2) -> DataRef:
    """Rows in the layout `stage` writes (row_id, input_ids, length, label, bucket, and per-token labels for
    causal_lm / sft), written with pyarrow alone: for the benchmarks and the GPU check, which run the
    training loop without Spark. Row i goes to file i % num_files; row ids are the row numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(path)
    lengths = np.array([len(x) for x in input_ids], dtype=np.int32)
    buckets = length_buckets(lengths).astype(np.int32)
    for f in range(num_files):
        rows = list(range(f, len(input_ids), num_files))
        columns = {
            "row_id": pa.array(rows, pa.int64()),
            "input_ids": pa.array([list(input_ids[i]) for i in rows], pa.list_(pa.int32())),
            "length": pa.array(lengths[rows], pa.int32()),
            "label": pa.array([int(labels[i]) for i in rows], pa.int64()),
            BUCKET: pa.array(buckets[rows], pa.int32()),
        }
        if token_labels is not None:
            columns[TOKEN_LABELS] = pa.array([list(token_labels[i]) for i in rows], pa.list_(pa.int32()))
        pq.write_table(pa.table(columns), os.path.join(path, f"part-{f:05d}.parquet"))
    return DataRef(path=path, num_rows=len(input_ids))


def check_training_shards(ref: DataRef, processes: int) -> None:
    """Refuse, before training starts, staged training data that leaves a process without rows.

    Ranks own whole row groups, so fewer row groups than processes leaves some rank with none, and a
    rank with no batches cannot take part in DDP's steps (the others would wait on it). Tiny data only:
    staging writes 2 files per process, and files are filled by a hash of each row."""
    from spark_tuning.errors import InputError

    groups = len(row_groups(ref.path))
    if groups < processes:
        raise InputError(
            f"the {ref.num_rows} training rows were staged as {groups} row group(s), fewer than the {processes} "
            f"training processes (distributed.num_processes = {processes}), and each process needs rows of its "
            f"own: set distributed.num_processes to at most {max(1, groups)}, or train on more rows"
        )


def _files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "*.parquet")))


def row_groups(path: str) -> list[tuple[str, int, int]]:
    """Every (file, row group, rows) of a staged folder, in a fixed order that every rank agrees on."""
    import pyarrow.parquet as pq

    out = []
    for f in _files(path):
        meta = pq.ParquetFile(f).metadata
        out += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    return out


@dataclass
class Shard:
    """One rank's rows, in memory: token ids as one flat array plus offsets (no Python list per row)."""

    row_ids: np.ndarray
    labels: np.ndarray  # class ids (int64); targets (float32, regression); multi-hot rows (float32 [rows, labels])
    lengths: np.ndarray
    offsets: np.ndarray  # row i is values[offsets[i]:offsets[i+1]]
    values: np.ndarray
    rows_per_rank: list[int]
    token_labels: Optional[np.ndarray] = None  # causal_lm / sft: flat, row i is [offsets[i]:offsets[i+1]]
    buckets: Optional[np.ndarray] = None  # the staged `bucket` column; None: computed from the lengths
    token_types: Optional[np.ndarray] = None  # text pairs: flat, with the offsets of input_ids

    def __len__(self) -> int:
        return len(self.row_ids)

    @classmethod
    def of_lengths(cls, lengths: np.ndarray, buckets: Optional[np.ndarray] = None) -> "Shard":
        """Rows known by their lengths only: enough to plan batches (batches.plan_train_batches)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        empty = np.zeros(0, dtype=np.int32)
        return cls(np.arange(len(lengths)), np.zeros(len(lengths), dtype=np.int64), lengths,
                   np.zeros(len(lengths) + 1, dtype=np.int64), empty, [len(lengths)], buckets=buckets)

    def bucket_keys(self) -> np.ndarray:
        return self.buckets if self.buckets is not None else length_buckets(self.lengths)

    def ids(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def read_shard(ref: DataRef, rank: int, world_size: int, columns: Optional[list[str]] = None) -> Shard:
    """Read this rank's row groups (every world_size-th, starting at rank)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups = row_groups(ref.path)
    if columns is None and groups:
        columns = _columns_present(groups[0][0])
    rows_per_rank = [sum(n for _, _, n in groups[r::world_size]) for r in range(world_size)]
    tables = []
    for f, g, _ in groups[rank::world_size]:
        tables.append(pq.ParquetFile(f).read_row_group(g, columns=columns or TRAIN_COLUMNS))
    if not tables:
        empty = np.zeros(0, dtype=np.int64)
        return Shard(empty, empty, empty, np.zeros(1, dtype=np.int64), empty, rows_per_rank)
    table = pa.concat_tables(tables).combine_chunks()
    ids = table.column("input_ids").chunk(0)
    offsets = ids.offsets.to_numpy().astype(np.int64)
    values = ids.values.to_numpy(zero_copy_only=False)
    # Offsets of a sliced array start where the slice starts: rebase them onto `values`.
    values = values[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    return Shard(
        row_ids=table.column("row_id").to_numpy(),
        labels=_labels(table),
        lengths=table.column("length").to_numpy().astype(np.int64),
        offsets=offsets,
        values=values,
        rows_per_rank=rows_per_rank,
        token_labels=_flat_per_token(table, TOKEN_LABELS, offsets),
        token_types=_flat_per_token(table, TOKEN_TYPES, offsets),
        buckets=table.column(BUCKET).to_numpy().astype(np.int64) if BUCKET in table.column_names else None,
    )


def rank_lengths(ref: DataRef, world_size: int) -> list[Shard]:
    """Every rank's rows as read_shard reads them (its row groups, in the same order), by length (and
    staged length bucket) only: the driver plans each rank's batches exactly as the rank will."""
    import pyarrow.parquet as pq

    groups, shards = row_groups(ref.path), []
    for rank in range(world_size):
        lengths, buckets = [], []
        for f, g, _ in groups[rank::world_size]:
            names = pq.ParquetFile(f).schema_arrow.names
            t = pq.ParquetFile(f).read_row_group(g, columns=[c for c in ("length", BUCKET) if c in names])
            lengths.append(t.column("length").to_numpy().astype(np.int64))
            if BUCKET in t.column_names:
                buckets.append(t.column(BUCKET).to_numpy().astype(np.int64))
        cat = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        shards.append(Shard.of_lengths(cat, np.concatenate(buckets) if buckets and len(buckets) == len(lengths) else None))
    return shards


def _labels(table) -> np.ndarray:
    """Class ids as int64; numeric targets (regression) as float32; -1 where rows have no label."""
    import pyarrow as pa

    if "label" not in table.column_names:
        return np.full(table.num_rows, -1, dtype=np.int64)
    column = table.column("label")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):  # multi-hot (multilabel)
        flat = column.combine_chunks()
        width = len(flat[0]) if len(flat) else 0
        return flat.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(flat), width)
    if pa.types.is_floating(column.type):
        return column.to_numpy().astype(np.float32)
    return column.to_numpy().astype(np.int64)


def _columns_present(path: str) -> list[str]:
    """TRAIN_COLUMNS plus per-token labels (LM tasks, token classification) and token types (text pairs)
    where the staged rows have them."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    return [c for c in TRAIN_COLUMNS + [TOKEN_LABELS, TOKEN_TYPES, BUCKET] if c in names]


def _flat_per_token(table, column: str, offsets: np.ndarray) -> Optional[np.ndarray]:
    """A per-token column (labels, token type ids) as one flat array with the offsets of input_ids."""
    if column not in table.column_names:
        return None
    col = table.column(column).chunk(0)
    own = col.offsets.to_numpy().astype(np.int64)
    flat = col.values.to_numpy(zero_copy_only=False)[own[0]:own[-1]]
    if len(flat) != offsets[-1]:
        raise ValueError(f"staged {column} and input_ids differ in length")
    return flat.astype(np.int64)
