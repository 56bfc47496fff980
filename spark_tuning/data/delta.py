"""Delta tables, with or without Spark's Delta connector (the I/O edge).

- Where the session has the connector (Databricks; `delta-spark` with its jars on the classpath), Spark
  reads the table itself: `format("delta")` for a path, the catalog for a table name, `versionAsOf` for
  `data.version`.
- Where it does not (a plain pip pyspark), the `deltalake` package (delta-rs) reads the table's log and
  lists the Parquet files of the version asked for (its current snapshot by default); Spark then reads
  those files itself, so the read stays distributed. Partition values, which Delta keeps in the log and not
  in the files, are added back as columns; files written before a column was added get nulls for it.
  Deleted rows are honoured because delta-rs and Spark without the connector only ever see the files
  of the snapshot: tables whose deletes or renames live elsewhere (deletion vectors, column mapping) or
  whose readers must know other features are refused with the feature named.
"""

from __future__ import annotations

from typing import Optional

from spark_tuning.errors import InputError

# Reader features a plain Parquet read of the snapshot's files cannot honour, and why.
UNSUPPORTED = {
    "deletionVectors": "deleted rows are marked in deletion vectors, not removed from the files",
    "columnMapping": "columns are renamed or dropped through column mapping, not in the files",
    "typeWidening": "column types were widened after files were written",
}
# Reader features that change nothing for a read of the snapshot's files (delta-rs has read the log).
HARMLESS = {"timestampNtz", "vacuumProtocolCheck", "v2Checkpoint"}
CONNECTOR_FIX = ("read it with Spark's Delta connector (on Databricks it is built in; elsewhere install "
                 "delta-spark and start Spark with its jars: spark.jars.packages io.delta:delta-spark_2.13:<version> "
                 "and the DeltaSparkSessionExtension)")


def has_connector(spark) -> bool:
    """Whether this session can read Delta itself (the connector's data source is on its classpath)."""
    try:
        spark._jvm.java.lang.Class.forName("org.apache.spark.sql.delta.sources.DeltaDataSource")
        return True
    except Exception:  # noqa: BLE001 - py4j raises its own error for a missing class; Spark Connect has no _jvm
        return not hasattr(spark, "_jvm")  # Spark Connect (Databricks serverless): the server has Delta


def read(spark, source: str, path: Optional[str], version: Optional[int]):
    """`source` (the data.source setting) as a DataFrame: a Delta folder at `path`, or (path None) a table
    name in Spark's catalog; `version`: time travel (None: the current version)."""
    if has_connector(spark):
        if path is None:
            at = f" VERSION AS OF {int(version)}" if version is not None else ""
            return spark.sql(f"SELECT * FROM {source}{at}")
        reader = spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", int(version))
        return reader.load(path)
    if path is None:
        raise InputError(f"data.source = {source!r} is a table name, and this Spark session has no Delta connector "
                         f"to look it up: point data.source at the table's folder, or {CONNECTOR_FIX}")
    return read_snapshot(spark, source, path, version)


def read_snapshot(spark, source: str, path: str, version: Optional[int]):
    """The files of one version of the table at `path`, read by Spark, with their partition columns."""
    try:
        from deltalake import DeltaTable
    except ImportError:
        raise InputError(f"data.source = {source!r} is a Delta table and this Spark session has no Delta connector: "
                         f"pip install deltalake (the project reads the table's files through it), or {CONNECTOR_FIX}") from None
    try:
        table = DeltaTable(path, version=version)
    except Exception as e:  # noqa: BLE001 - delta-rs raises TableNotFoundError, DeltaError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (f"data.version = {version} may not exist (versions start at 0)" if version is not None else
                "check that the folder holds a Delta table (a _delta_log folder with JSON commits)")
        raise InputError(f"data.source = {source!r} could not be read as a Delta table: {first}: {hint}") from None
    problem = unsupported_features(table)
    if problem:
        raise InputError(f"data.source = {source!r} (Delta, version {table.version()}) {problem}, which reading its "
                         f"Parquet files without Spark's Delta connector cannot honour: {CONNECTOR_FIX}")
    import pyarrow as pa

    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        schema = pa.schema(table.schema().to_arrow()) if hasattr(table.schema(), "to_arrow") else None
        if schema is not None:
            return spark.createDataFrame(schema.empty_table().to_pandas())
        raise InputError(f"data.source = {source!r} (Delta, version {table.version()}) holds no rows")
    parts = table.metadata().partition_columns
    uris = [_file_uri(table.table_uri, p) for p in actions.column("path").to_pylist()]
    if not parts:
        return spark.read.option("mergeSchema", "true").parquet(*uris)
    from pyspark.sql import functions as F

    groups: dict[tuple, list[str]] = {}
    values = [actions.column(f"partition.{c}").to_pylist() for c in parts]
    for i, uri in enumerate(uris):
        groups.setdefault(tuple(v[i] for v in values), []).append(uri)
    frames = []
    for key, files in groups.items():
        df = spark.read.option("mergeSchema", "true").parquet(*files)
        for column, value in zip(parts, key):
            df = df.withColumn(column, F.lit(value))
        frames.append(df)
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df, allowMissingColumns=True)
    return out


def unsupported_features(table) -> Optional[str]:
    """Why the table's snapshot files alone do not hold its rows (None: they do)."""
    protocol = table.protocol()
    features = set(protocol.reader_features or ())
    config = table.metadata().configuration or {}
    mapping = config.get("delta.columnMapping.mode", "none")
    if mapping != "none":
        features.add("columnMapping")
    if protocol.min_reader_version == 2 and not features:
        features.add("columnMapping")  # reader version 2 is column mapping
    named = sorted(f for f in features if f in UNSUPPORTED)
    if named:
        return "uses " + "; ".join(f"{f} ({UNSUPPORTED[f]})" for f in named)
    unknown = sorted(f for f in features if f not in HARMLESS)
    if unknown or protocol.min_reader_version > 3:
        return f"needs reader features {unknown or [f'reader version {protocol.min_reader_version}']}"
    return None


def _file_uri(table_uri: str, path: str) -> str:
    """A data file's location for Spark: the log's path (relative and URL-encoded, or absolute) on the table's."""
    from urllib.parse import unquote

    if "://" in path or path.startswith("/"):
        return path
    base = table_uri[len("file://"):] if table_uri.startswith("file://") else table_uri
    return base.rstrip("/") + "/" + unquote(path)
