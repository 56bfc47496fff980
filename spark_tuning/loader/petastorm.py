"""The `loader: petastorm` backend: stage with petastorm's Spark converter, read with its torch loader.

For runtimes that ship petastorm (Databricks Runtime ML up to 15.4 LTS has petastorm 0.12 with pyarrow 14).
petastorm 0.12/0.13 import `pyarrow.filesystem` and pass `validate_schema` to `ParquetDataset`, both gone
in pyarrow 15, so this backend needs the legacy stack of conf/env/constraints-petastorm.txt
(`source jobs/bootstrap_petastorm.sh`); `check_available` says so before any Spark work.

The backend's only job is the same one as loader.py's: give each rank its rows (`Shard`). Batch planning
and per-batch padding are shared, so for the same seed both backends give the same batches:
- staging goes through `loader.with_length_buckets` and `loader.with_row_ids`, so rows, ids and file
  layout match the Parquet backend; the `bucket` column is not read back: `Shard.bucket_keys` recomputes
  the same buckets from the lengths;
- petastorm's torch loader refuses arrays of different lengths in one batch, so `input_ids` are stored
  padded to `max_length` next to their true `length`, and trimmed back as they are read: training still
  pads each batch only to its own longest row;
- petastorm shards by row group (group i of the files in name order goes to shard i % world), the same
  rule as `loader.read_shard`; rows are put back in `row_id` order, which is the Parquet backend's order.
  The two backends agree row for row when each staged file holds the same row groups in both, which is
  the case while files stay below Spark's row-group size (128 MB: tokenized data up to ~2 x 128 MB per
  process); beyond that each backend is still deterministic, but ranks may get different rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from spark_tuning.errors import InputError, JobFailed
from spark_tuning.loader.staging import TRAIN_COLUMNS, DataRef, Shard, row_groups, with_length_buckets, with_row_ids

NEEDS_PYARROW_BELOW = 15
INSTALL_HINT = (
    "run in the legacy environment (`source jobs/bootstrap_petastorm.sh` makes .venv-petastorm with "
    "pyarrow 14.0.2, pyspark 4.0.5, numpy 1.26.4, petastorm 0.12.1 from conf/env/constraints-petastorm.txt; "
    "or `pip install 'spark-tuning[petastorm]' -c conf/env/constraints-petastorm.txt`), or on a runtime that "
    "ships petastorm (Databricks Runtime ML 15.4 LTS or older), or set loader.kind: parquet (the default; "
    "same batches, no extra packages)"
)
READ_BATCH_ROWS = 1024  # rows per batch pulled from petastorm while filling the shard
ROW_GROUP_BYTES = 128 * 1024 * 1024  # Spark's own Parquet row-group size, so that layouts match


@dataclass(frozen=True)
class PetastormRef(DataRef):
    """A converter's cache, as plain data: each rank re-creates the converter from it.

    `path` is the cache folder (a Spark Parquet folder: Spark and pandas read it too); `cache_url` and
    `file_urls` are what petastorm needs, the files in name order."""

    cache_url: str = ""
    file_urls: tuple[str, ...] = field(default_factory=tuple)


def check_available() -> None:
    """Fail fast (InputError, before Spark starts) where petastorm cannot run."""
    import pyarrow

    major = int(pyarrow.__version__.split(".")[0])
    if major >= NEEDS_PYARROW_BELOW:
        raise InputError(
            f"loader.kind = 'petastorm' needs pyarrow < {NEEDS_PYARROW_BELOW} (petastorm 0.12/0.13 use "
            f"pyarrow.filesystem, removed in pyarrow 15), but this environment has pyarrow "
            f"{pyarrow.__version__}: {INSTALL_HINT}"
        )
    try:
        import petastorm.spark  # noqa: F401
    except ImportError as e:
        raise InputError(f"loader.kind = 'petastorm' needs the petastorm package ({e}): {INSTALL_HINT}") from None


def fixed_length(df, max_length: int):
    """`input_ids` right-padded with zeros to exactly `max_length` (the true size stays in `length`).

    Pure: DataFrame -> DataFrame. The pad value never reaches the model: rows are trimmed to `length`
    when read, and batches are padded with the tokenizer's own pad id."""
    from pyspark.sql import functions as F

    pad = F.array_repeat(F.lit(0).cast("int"), F.greatest(F.lit(max_length) - F.size("input_ids"), F.lit(0)))
    return df.withColumn("input_ids", F.slice(F.concat("input_ids", pad), 1, max_length))


def stage(df, path: str, num_files: int, max_length: int) -> PetastormRef:
    """Materialise a tokenized DataFrame with `make_spark_converter` into a cache under `path`.

    Other columns (e.g. `text`, for the predictions file) are kept in the cache; readers select only the
    numeric training columns, since petastorm's torch loader refuses strings."""
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    spark = df.sparkSession
    os.makedirs(path, exist_ok=False)
    key = SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF
    before = spark.conf.get(key, None)
    # The cache lives inside the job's staging folder, so finetune.py removes it whatever happens.
    spark.conf.set(key, "file://" + os.path.abspath(path))
    try:
        converter = make_spark_converter(fixed_length(with_row_ids(with_length_buckets(df), num_files), max_length),
                                         parquet_row_group_size_bytes=ROW_GROUP_BYTES, compression_codec="snappy")
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)
    local = _local_path(converter.cache_dir_url)
    return PetastormRef(path=local, num_rows=len(converter), cache_url=converter.cache_dir_url,
                        file_urls=tuple(sorted(converter.file_urls)))


def _local_path(url: str) -> str:
    for prefix in ("file://", "file:"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return url


def read_shard(ref: PetastormRef, rank: int, world_size: int) -> Shard:
    """This rank's rows through petastorm's torch loader, trimmed to their true lengths, in row_id order."""
    from petastorm.pytorch import BatchedDataLoader
    from petastorm.spark import SparkDatasetConverter

    groups = row_groups(ref.path)
    rows_per_rank = [sum(n for _, _, n in groups[r::world_size]) for r in range(world_size)]
    # petastorm refuses to cut fewer row groups than ranks into world_size shards (NoDataAvailableError),
    # even for a rank that would get one. With fewer groups than ranks, rank r < len(groups) owns group r
    # alone (the rule above), and cutting into len(groups) shards gives it the same group.
    shards = min(world_size, len(groups))
    converter = SparkDatasetConverter(ref.cache_url, list(ref.file_urls), ref.num_rows)
    ids_parts, len_parts, label_parts, value_parts = [], [], [], []
    if rows_per_rank[rank]:
        loader = converter.make_torch_dataloader(
            batch_size=READ_BATCH_ROWS, num_epochs=1, workers_count=1, shuffling_queue_capacity=0,
            data_loader_fn=BatchedDataLoader, cur_shard=rank, shard_count=shards,
            shuffle_row_groups=False, schema_fields=list(TRAIN_COLUMNS))
        with loader as batches:
            for batch in batches:
                lengths = batch["length"].numpy().astype(np.int64)
                padded = batch["input_ids"].numpy()
                keep = np.arange(padded.shape[1])[None, :] < lengths[:, None]
                value_parts.append(padded[keep])  # row-major: each row's first `length` ids, rows in order
                ids_parts.append(batch["row_id"].numpy().astype(np.int64))
                len_parts.append(lengths)
                label_parts.append(batch["label"].numpy().astype(np.int64))
    if not ids_parts:
        empty = np.zeros(0, dtype=np.int64)
        return Shard(empty, empty, empty, np.zeros(1, dtype=np.int64), empty, rows_per_rank)
    row_ids, lengths = np.concatenate(ids_parts), np.concatenate(len_parts)
    labels, values = np.concatenate(label_parts), np.concatenate(value_parts)
    if len(row_ids) != rows_per_rank[rank]:
        raise JobFailed(
            f"petastorm gave rank {rank} {len(row_ids)} rows, but its row groups in {ref.path} hold "
            f"{rows_per_rank[rank]}: this petastorm version shards differently; use loader.kind: parquet"
        )
    # Back into row_id order (the Parquet backend's order), moving each row's slice of `values`.
    order = np.argsort(row_ids, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    new_offsets = np.concatenate([[0], np.cumsum(lengths[order])])
    gather = np.repeat(offsets[:-1][order] - new_offsets[:-1], lengths[order]) + np.arange(new_offsets[-1])
    return Shard(row_ids=row_ids[order], labels=labels[order], lengths=lengths[order], offsets=new_offsets,
                 values=values[gather], rows_per_rank=rows_per_rank)
