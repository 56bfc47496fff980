"""From Spark to PyTorch: stage tokenized rows as Parquet once; each rank reads only its own row groups.

Staging writes `world_size * k` similar-sized files, so row groups split evenly between ranks. A rank
reads its groups with pyarrow (only the columns it needs) and cuts them into batches that are padded to
their own longest row. With `group_by_length`, rows of similar length share a batch ("sortish" batching:
shuffle, sort within chunks of 50 batches, shuffle the batches), which keeps training random while
wasting little compute on padding.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

TRAIN_COLUMNS = ["row_id", "input_ids", "length", "label"]
# causal_lm / sft rows also carry per-token labels (-100 where no loss is taken), with the same offsets.
TOKEN_LABELS = "labels"
IGNORE_INDEX = -100
SORTISH_CHUNK = 50  # batches per sorting window


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


def stage(df, path: str, num_files: int) -> DataRef:
    """Write a tokenized DataFrame once as Parquet (with a stable `row_id`) and describe it."""
    staged = with_row_ids(df, num_files)
    staged.write.mode("error").parquet(path)
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in _files(path))
    return DataRef(path=path, num_rows=rows)


def check_training_shards(ref: DataRef, processes: int) -> None:
    """Refuse, before training starts, staged training data that leaves a process without rows.

    Ranks own whole row groups, so fewer row groups than processes leaves some rank with none, and a
    rank with no batches cannot take part in DDP's steps (the others would wait on it). Tiny data only:
    staging writes 2 files per process, and files are filled by a hash of each row."""
    from spark_tuning.errors import InputError

    groups = len(_row_groups(ref.path))
    if groups < processes:
        raise InputError(
            f"the {ref.num_rows} training rows were staged as {groups} row group(s), fewer than the {processes} "
            f"training processes (distributed.num_processes = {processes}), and each process needs rows of its "
            f"own: set distributed.num_processes to at most {max(1, groups)}, or train on more rows"
        )


def _files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "*.parquet")))


def _row_groups(path: str) -> list[tuple[str, int, int]]:
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
    labels: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray  # row i is values[offsets[i]:offsets[i+1]]
    values: np.ndarray
    rows_per_rank: list[int]
    token_labels: Optional[np.ndarray] = None  # causal_lm / sft: flat, row i is [offsets[i]:offsets[i+1]]

    def __len__(self) -> int:
        return len(self.row_ids)

    def ids(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def read_shard(ref: DataRef, rank: int, world_size: int, columns: Optional[list[str]] = None) -> Shard:
    """Read this rank's row groups (every world_size-th, starting at rank)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups = _row_groups(ref.path)
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
        labels=(table.column("label").to_numpy().astype(np.int64) if "label" in table.column_names
                else np.full(table.num_rows, -1, dtype=np.int64)),
        lengths=table.column("length").to_numpy().astype(np.int64),
        offsets=offsets,
        values=values,
        rows_per_rank=rows_per_rank,
        token_labels=_flat_token_labels(table, offsets),
    )


def _columns_present(path: str) -> list[str]:
    """TRAIN_COLUMNS plus per-token labels where the staged rows have them (causal_lm, sft)."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    return [c for c in TRAIN_COLUMNS + [TOKEN_LABELS] if c in names]


def _flat_token_labels(table, offsets: np.ndarray) -> Optional[np.ndarray]:
    if TOKEN_LABELS not in table.column_names:
        return None
    col = table.column(TOKEN_LABELS).chunk(0)
    own = col.offsets.to_numpy().astype(np.int64)
    flat = col.values.to_numpy(zero_copy_only=False)[own[0]:own[-1]]
    if len(flat) != offsets[-1]:
        raise ValueError("staged labels and input_ids differ in length")
    return flat.astype(np.int64)


def batches_per_epoch(shard: Shard, batch_size: int) -> int:
    """The same number on every rank (DDP needs it): ranks with fewer rows wrap around to fill up."""
    return math.ceil(max(shard.rows_per_rank) / batch_size)


def plan_train_batches(shard: Shard, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[np.ndarray]:
    """Row indices of each training batch for one epoch: seeded, so every run sees the same order."""
    rng = np.random.default_rng([seed, epoch])
    n_batches = batches_per_epoch(shard, batch_size)
    if len(shard) == 0:
        return []
    order = rng.permutation(len(shard))
    need = n_batches * batch_size
    order = np.resize(order, need)  # wrap around: every rank does the same number of steps
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, need, batch_size)]
    chunk = batch_size * SORTISH_CHUNK
    batches = []
    for start in range(0, need, chunk):
        window = order[start:start + chunk]
        window = window[np.argsort(shard.lengths[window], kind="stable")]
        batches += [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def plan_eval_batches(shard: Shard, batch_size: int) -> list[np.ndarray]:
    """Validation batches sorted by length: predictions do not depend on order, padding does."""
    order = np.lexsort((shard.row_ids, shard.lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(shard: Shard, index: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Pad one batch to its own longest row (right padding), with an attention mask. LM rows get their
    per-token labels, padded with -100 (never derived from pad ids: SmolLM2 pads with its EOS)."""
    if shard.token_labels is not None:
        return _collate_lm(shard, index, pad_id)
    lengths = shard.lengths[index]
    width = int(lengths.max())
    input_ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    for row, i in enumerate(index):
        n = lengths[row]
        input_ids[row, :n] = shard.ids(i)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": shard.labels[index]}


def _collate_lm(shard: Shard, index: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    lengths = shard.lengths[index]
    width = int(lengths.max())
    input_ids = np.full((len(index), width), pad_id, dtype=np.int64)
    labels = np.full((len(index), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    for row, i in enumerate(index):
        n, start = lengths[row], shard.offsets[i]
        input_ids[row, :n] = shard.values[start:start + n]
        labels[row, :n] = shard.token_labels[start:start + n]
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def iterate(shard: Shard, plan: list[np.ndarray], pad_id: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    for index in plan:
        yield index, collate(shard, index, pad_id)


# ----------------------------------------------------------------------------------------------------
# Backends. `loader.kind` decides only how staged rows reach each rank's Shard; batch planning and
# padding above are shared by all of them. The refs travel to the ranks as plain dicts.


def stage_as(kind: str, df, path: str, num_files: int, max_length: int) -> DataRef:
    if kind == "petastorm":
        from spark_tuning import loader_petastorm

        return loader_petastorm.stage(df, path, num_files, max_length)
    return stage(df, path, num_files)


def read_shard_as(kind: str, ref: dict, rank: int, world_size: int) -> Shard:
    if kind == "petastorm":
        from spark_tuning import loader_petastorm

        return loader_petastorm.read_shard(loader_petastorm.PetastormRef(**ref), rank, world_size)
    return read_shard(DataRef(**ref), rank, world_size)
