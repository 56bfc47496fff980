"""The loader backends, the one module that knows both: `loader.kind` decides only how staged rows reach
each rank's Shard ("parquet": each rank reads its own row groups with pyarrow; "petastorm": petastorm's
Spark converter and reader, for runtimes that still ship it). Batch planning and padding (batches.py) are
shared. The refs travel to the ranks as plain dicts."""

from __future__ import annotations

from spark_tuning.loader.staging import DataRef, Shard, read_shard, stage


def stage_as(kind: str, df, path: str, num_files: int, max_length: int) -> DataRef:
    if kind == "petastorm":
        from spark_tuning.loader import petastorm

        return petastorm.stage(df, path, num_files, max_length)
    return stage(df, path, num_files)


def read_shard_as(kind: str, ref: dict, rank: int, world_size: int) -> Shard:
    if kind == "petastorm":
        from spark_tuning.loader import petastorm

        return petastorm.read_shard(petastorm.PetastormRef(**ref), rank, world_size)
    return read_shard(DataRef(**ref), rank, world_size)
