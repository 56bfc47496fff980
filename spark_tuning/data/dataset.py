"""Data in Spark: read a source, check it, clean it, encode labels, split and sample.

`read_source` is the I/O edge. Everything else is a pure `DataFrame -> DataFrame` transform (or a small
check that runs one aggregate), so each step can be tested on a DataFrame built in the test.
After `prepare`, every DataFrame has exactly two columns: `text` (string) and `label` (int id).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, TYPE_CHECKING

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_tuning.errors import InputError, error_line
from spark_tuning.paths import PACKAGE_PREFIX, resolve_package_path

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import DataConfig

log = logging.getLogger(__name__)

TEXT, LABEL, TEXT_PAIR = "text", "label", "text_pair"
LONG_TEXT = 100_000  # characters: worth a warning (a 1 MB review is usually a data error)


@dataclass(frozen=True)
class LabelInfo:
    names: tuple[str, ...]  # names[i] is the name of class id i
    from_strings: bool  # True when the source held string labels that were mapped to ids

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))


@dataclass(frozen=True)
class Prepared:
    train: DataFrame
    eval: DataFrame
    labels: LabelInfo
    counts: dict[str, int]


# ----------------------------------------------------------------------------------------------------
# Reading (the I/O edge)


def infer_format(source: str) -> str:
    path = resolve_package_path(source) if source.startswith(PACKAGE_PREFIX) else source
    lower = path.lower().rstrip("/")
    for ext, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "json"), (".json", "json")):
        if lower.endswith(ext):
            return fmt
    if os.path.isdir(path):
        names = os.listdir(path)
        if "_delta_log" in names:
            return "delta"
        if "dataset_dict.json" in names or "dataset_info.json" in names or "state.json" in names:
            return "hf_disk"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith((".json", ".jsonl")) for n in names):
            return "json"
        if any(n.endswith(".csv") for n in names):
            return "csv"
        raise InputError(
            f"data.source = {source!r} is a folder, but its format cannot be told from its files: "
            "set data.format (parquet, csv, json, delta, hf_disk)"
        )
    if path.startswith(("/", ".", "~", "dbfs:/", "file:", "s3", "abfss:", "gs:")):
        raise InputError(
            f"data.source = {source!r}: no such file or folder ({os.path.abspath(path)}): fix the path"
        )
    return "table_or_hub"


def read_source(
    spark: SparkSession, source: str, fmt: str, split: Optional[str] = None, encoding: str = "utf-8",
    version: Optional[int] = None,
) -> tuple[DataFrame, Optional[list[str]]]:
    """Read any supported source into a DataFrame. Also returns class names when the source declares
    them (a Hugging Face ClassLabel feature), else None. `version`: a Delta table's version (data.version)."""
    path = resolve_package_path(source) if source.startswith(PACKAGE_PREFIX) else source
    if fmt == "auto":
        fmt = infer_format(source)
    if fmt == "table_or_hub":
        fmt = "table" if spark.catalog.tableExists(source) else "hf_hub"
    if version is not None and fmt not in ("delta", "table"):
        raise InputError(f"data.version = {version} is a Delta table's version, but data.source = {source!r} is "
                         f"{fmt}: remove data.version, or point data.source at a Delta table")
    is_local = "://" not in path and not path.startswith(("dbfs:", "s3", "abfss:", "gs:"))
    if fmt in ("parquet", "csv", "json", "delta", "hf_disk") and is_local and not os.path.exists(path):
        raise InputError(f"data.source = {source!r}: no such file or folder ({os.path.abspath(path)}): fix the path")
    try:
        if fmt == "parquet":
            return spark.read.parquet(path), None
        if fmt == "csv":
            # multiLine: reviews contain newlines inside quoted fields.
            reader = spark.read.option("header", True).option("inferSchema", True).option("encoding", encoding)
            return reader.option("multiLine", True).option("escape", '"').csv(path), None
        if fmt == "json":
            return spark.read.option("encoding", encoding).json(path), None
        if fmt == "table":
            if version is not None:
                from spark_tuning.data import delta

                return delta.read(spark, source, None, version), None
            return spark.table(source), None
        if fmt == "delta":
            from spark_tuning.data import delta

            return delta.read(spark, source, path, version), None
        if fmt in ("hf_disk", "hf_hub"):
            return _read_hf(spark, path, fmt, split)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - Spark's AnalysisException and friends
        raise InputError(f"data.source = {source!r} could not be read as {fmt}: {error_line(e)}: "
                         f"{READ_FIXES.get(fmt, 'check data.source and data.format')}") from None
    raise InputError(f"data.format = {fmt!r} is not supported")


READ_FIXES = {
    "parquet": "check that data.source holds Parquet files, or set data.format to what it holds",
    "csv": "check the file (a header row, quoted fields), data.format and data.encoding",
    "json": "check that the file holds one JSON object per line, data.format and data.encoding",
    "table": "check the table name (catalog.schema.table) and that this session may read it",
    "delta": "check that the folder is a Delta table",
}


def _read_hf(spark: SparkSession, path: str, fmt: str, split: Optional[str]):
    import datasets

    if fmt == "hf_disk":
        ds = datasets.load_from_disk(path)
    else:
        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as e:  # noqa: BLE001
            raise InputError(
                f"data.source = {path!r} is neither a file, a Spark table nor a reachable Hugging Face "
                f"dataset ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}): "
                "fix the name, or save it with datasets' save_to_disk and point data.source at the folder"
            ) from None
    if isinstance(ds, datasets.DatasetDict):
        wanted = split or "train"
        if wanted not in ds:
            raise InputError(f"dataset {path!r} has no split {wanted!r}; it has {sorted(ds)}: set data.train_split")
        ds = ds[wanted]
    names = None
    for feature in ds.features.values():
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
    return spark.createDataFrame(ds.to_pandas()), names


# ----------------------------------------------------------------------------------------------------
# Pure transforms and checks


def select_columns(df: DataFrame, text_column: str, label_column: str, pair_column: Optional[str] = None) -> DataFrame:
    """Keep the text and label columns, renamed to `text` and `label` (and the pair's second text as
    `text_pair`); name the columns that exist. A pair column must hold text in every row."""
    wanted = {"text": text_column, "label": label_column, **({"text_pair": pair_column} if pair_column else {})}
    missing = [f"data.{k}_column = {c!r}" for k, c in wanted.items() if c not in df.columns]
    if missing:
        raise InputError(f"{' and '.join(missing)}: no such column in the data; it has {df.columns}: set the column "
                         "names in data:")
    for key in ("text", "text_pair"):
        column = wanted.get(key)
        if column and not isinstance(df.schema[column].dataType, T.StringType):
            raise InputError(f"data.{key}_column = {column!r} holds {df.schema[column].dataType.simpleString()}, "
                             "not text: name the column that holds the text")
    out = df.select(F.col(text_column).alias(TEXT), F.col(label_column).alias(LABEL),
                    *([F.col(pair_column).alias(TEXT_PAIR)] if pair_column else []))
    if pair_column:
        row = out.agg(F.sum(F.col(TEXT_PAIR).isNull().cast("int")).alias("nulls"), F.count(F.lit(1)).alias("rows"),
                      F.first(F.when(F.col(TEXT_PAIR).isNull(), F.substring(TEXT, 1, 60)), ignorenulls=True).alias("ex")).first()
        if row["nulls"]:
            raise InputError(f"data.text_pair_column = {pair_column!r} is null in {row['nulls']} of {row['rows']} rows "
                             f"(e.g. beside the text {row['ex']!r}): every row needs both texts; fill or drop those rows")
    return out


def clean(df: DataFrame) -> DataFrame:
    """Drop rows whose text is null, empty or only white space, and rows without a label."""
    return df.where(F.col(TEXT).isNotNull() & (F.length(F.trim(F.col(TEXT))) > 0) & F.col(LABEL).isNotNull())


def infer_labels(df: DataFrame, label_names: Optional[list[str]], source_names: Optional[list[str]]) -> LabelInfo:
    """Decide how labels map to ids. String labels are mapped to ids in sorted order (or in the order of
    data.label_names); integer labels are ids already."""
    dtype = df.schema[LABEL].dataType
    if isinstance(dtype, (T.FloatType, T.DoubleType)):
        bad = df.where(F.isnan(LABEL) | F.col(LABEL).isin(float("inf"), float("-inf"))).count()
        if bad:
            raise InputError(f"data.label_column holds NaN or infinite values in {bad} rows: class labels must be "
                             "integer ids or names; drop or fix those rows")
    values = [r[0] for r in df.select(LABEL).distinct().limit(10_001).collect()]
    if len(values) > 10_000:
        raise InputError("the label column has more than 10,000 distinct values: is data.label_column right?")
    if isinstance(dtype, T.StringType):
        as_int = [v for v in values if _is_int(v)]
        if as_int and len(as_int) < len(values):
            other = next(v for v in values if not _is_int(v))
            raise InputError(
                f"labels of mixed types in data.label_column: integers (e.g. {as_int[0]!r}) and strings "
                f"(e.g. {other!r}): make every label an integer id or every label a class name"
            )
        if not as_int:
            names = list(label_names) if label_names else sorted(values)
            unknown = sorted(set(values) - set(names))
            if unknown:
                raise InputError(
                    f"labels {unknown[:5]} are not in data.label_names = {names}: add them, or fix the data"
                )
            _check_classes(len(set(values)), values)
            return LabelInfo(tuple(names), from_strings=True)
        values = [int(v) for v in values]
    elif isinstance(dtype, (T.IntegerType, T.LongType, T.ShortType, T.ByteType, T.BooleanType)):
        values = [int(v) for v in values]
    elif isinstance(dtype, (T.FloatType, T.DoubleType)) and all(float(v).is_integer() for v in values):
        values = [int(v) for v in values]
    elif isinstance(dtype, T.ArrayType):
        example = df.where(F.size(LABEL) > 0).select(F.col(LABEL).cast("string")).first()
        raise InputError(
            f"data.label_column holds lists ({dtype.simpleString()}, e.g. {example[0] if example else '[]'}), but task "
            "classification takes one label per row: use task: multilabel_classification for several labels per row"
        )
    else:
        raise InputError(
            f"labels of type {dtype.simpleString()} cannot be class ids: use integer ids or class names"
        )
    _check_classes(len(set(values)), values)
    if not (label_names or source_names) and sorted(set(values)) != list(range(len(set(values)))):
        ids = sorted(set(values))
        raise InputError(
            f"integer labels {ids[:5]}{' ...' if len(ids) > 5 else ''} are not the ids 0..{len(ids) - 1} ({len(ids)} "
            f"distinct values, the largest {ids[-1]}): a head of {ids[-1] + 1} classes would be built for them. "
            "Name every class in data.label_names (one name per id, in id order), or renumber the labels 0..N-1")
    names = list(label_names or source_names or [str(i) for i in range(max(values) + 1)])
    bad = sorted(v for v in values if not 0 <= v < len(names))
    if bad:
        raise InputError(
            f"labels out of range: {bad[:5]} for {len(names)} classes (ids must be 0..{len(names) - 1}): "
            "fix the data or list every class in data.label_names"
        )
    _check_classes(len(set(values)), values)
    return LabelInfo(tuple(names), from_strings=False)


def check_eval_labels(df: DataFrame, info: LabelInfo, what: str) -> None:
    """Validation labels must be the training classes: names among info.names (string labels) or ids
    0..N-1, never NaN. Checked before any training: a bad one would fail the first evaluation, an epoch in."""
    dtype = df.schema[LABEL].dataType
    if info.from_strings:
        bad = df.where(~F.col(LABEL).cast("string").isin(list(info.names)))
        kind = f"are not among the training classes {list(info.names)}"
    else:
        bad_ids = ~F.col(LABEL).cast("double").between(0, len(info.names) - 1)
        if isinstance(dtype, (T.FloatType, T.DoubleType)):
            bad_ids = bad_ids | F.isnan(LABEL) | (F.col(LABEL) != F.floor(LABEL))
        if isinstance(dtype, T.StringType):
            bad_ids = bad_ids | ~F.col(LABEL).rlike(r"^\s*\d+\s*$")
        bad = df.where(bad_ids)
        kind = f"are not class ids 0..{len(info.names) - 1} of the training data"
    row = bad.agg(F.count(F.lit(1)).alias("n"), F.collect_set(F.col(LABEL).cast("string")).alias("v")).first()
    if row["n"]:
        raise InputError(f"the validation data ({what}): {row['n']} rows have labels that {kind} (e.g. "
                         f"{sorted(row['v'])[:5]}): fix those rows, or name every class in data.label_names")


def _is_int(v: str) -> bool:
    return v.strip().lstrip("-").isdigit()


def _check_classes(n: int, values: list) -> None:
    if n < 2:
        raise InputError(
            f"the data holds a single class ({values[0]!r}): classification needs at least two; "
            "check data.label_column and the source"
        )


def encode_labels(df: DataFrame, info: LabelInfo) -> DataFrame:
    """Replace labels by their integer ids."""
    if info.from_strings:
        mapping = F.create_map(*[x for i, name in enumerate(info.names) for x in (F.lit(name), F.lit(i))])
        return df.withColumn(LABEL, mapping[F.col(LABEL)].cast("int"))
    return df.withColumn(LABEL, F.col(LABEL).cast("int"))


def _key(seed: int, df: DataFrame) -> F.Column:
    # A hash of the row's content: the same rows get the same keys on every run and every cluster,
    # whatever the partitioning, and duplicate rows always land on the same side of a split.
    pair = [F.col(TEXT_PAIR)] if TEXT_PAIR in df.columns else []
    return F.xxhash64(F.lit(seed), F.col(TEXT), *pair, F.col(LABEL))


def split(df: DataFrame, fraction: float, seed: int) -> tuple[DataFrame, DataFrame]:
    """Seeded, deterministic train/validation split; validation gets round(fraction * rows) rows
    (a few more only when duplicate rows share the cut)."""
    keyed = df.withColumn("_key", _key(seed, df))
    n_eval = max(1, round(df.count() * fraction))
    cut = keyed.orderBy("_key").limit(n_eval).agg(F.max("_key")).first()[0]
    train = keyed.where(F.col("_key") > F.lit(cut)).drop("_key")
    evaluation = keyed.where(F.col("_key") <= F.lit(cut)).drop("_key")
    return train, evaluation


def sample(df: DataFrame, n: Optional[int], seed: int) -> DataFrame:
    """A seeded random sample of exactly n rows (all rows when there are fewer, or when n is None)."""
    if n is None:
        return df
    return df.withColumn("_key", _key(seed + 1, df)).orderBy("_key").limit(n).drop("_key")


# ----------------------------------------------------------------------------------------------------
# The whole data stage


def prepare(spark: SparkSession, cfg: DataConfig, seed: int) -> Prepared:
    """Source -> checked, cleaned, labelled, split and sampled `text`/`label` DataFrames."""
    fmt = cfg.format if cfg.format != "auto" else infer_format(cfg.source)
    if cfg.eval_split and fmt not in ("hf_disk", "hf_hub", "table_or_hub"):
        raise InputError(
            f"data.eval_split = {cfg.eval_split!r} names a split of a Hugging Face dataset, but data.source = "
            f"{cfg.source!r} is {fmt}: set data.eval_split: null (a seeded split is made) or data.eval_source"
        )
    raw, source_names = read_source(spark, cfg.source, cfg.format, cfg.train_split, cfg.encoding, cfg.version)
    df = select_columns(raw, cfg.text_column, cfg.label_column, cfg.text_pair_column)
    dropped: dict[str, dict] = {}
    df = clean_and_count(df, "source", dropped)
    eval_df = None
    if cfg.eval_source or cfg.eval_split:
        raw_eval, _ = read_source(spark, cfg.eval_source or cfg.source, cfg.format, cfg.eval_split, cfg.encoding)
        eval_df = clean_and_count(select_columns(raw_eval, cfg.text_column, cfg.label_column, cfg.text_pair_column),
                                  "validation source", dropped)
    labels = infer_labels(df, cfg.label_names, source_names)
    df = encode_labels(df, labels)
    if eval_df is None:
        train_df, eval_df = split(df, cfg.validation_fraction, seed)
    else:
        check_eval_labels(eval_df, labels, cfg.eval_source or f"data.eval_split = {cfg.eval_split!r}")
        train_df, eval_df = df, encode_labels(eval_df, labels)
    train_df, eval_df, counts = sampled(train_df, eval_df, cfg, seed, dropped)
    log.info("data: %d training rows, %d validation rows, classes %s",
             counts["train_rows"], counts["eval_rows"], list(labels.names))
    return Prepared(train_df, eval_df, labels, counts)


def sampled(train_df: DataFrame, eval_df: DataFrame, cfg: DataConfig, seed: int,
            dropped: Optional[dict[str, dict]] = None) -> tuple[DataFrame, DataFrame, dict]:
    """The splits sampled to data.train_limit / data.eval_limit and cached, with their row counts (and
    `dropped`, clean_and_count's counts of rows read and dropped, under "rows_dropped"); both must hold rows."""
    train_df = sample(train_df, cfg.train_limit, seed).cache()
    eval_df = sample(eval_df, cfg.eval_limit, seed).cache()
    counts: dict = {"train_rows": train_df.count(), "eval_rows": eval_df.count()}
    if dropped:
        counts["rows_dropped"] = dict(dropped)
    if counts["train_rows"] == 0 or counts["eval_rows"] == 0:
        raise InputError(
            f"after the split, train has {counts['train_rows']} rows and validation {counts['eval_rows']}: "
            "both need rows; use more data or change data.validation_fraction"
        )
    return train_df, eval_df, counts


def clean_and_count(df: DataFrame, what: str, dropped: Optional[dict[str, dict]] = None) -> DataFrame:
    """`df` without rows of null or empty text or null label; refuses undecodable text and sources left
    empty. `dropped` (the caller's dict) gets, under `what`, the rows read and the rows dropped per reason."""
    row = df.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.when(F.col(TEXT).isNull() | (F.length(F.trim(F.col(TEXT))) == 0), 1).otherwise(0)).alias("empty"),
        F.sum(F.when(F.col(LABEL).isNull(), 1).otherwise(0)).alias("nolabel"),
        # Bytes that are not valid UTF-8 arrive as U+FFFD: the file has another encoding.
        F.sum(F.when(F.col(TEXT).contains("\ufffd"), 1).otherwise(0)).alias("undecodable"),
        F.sum(F.when(F.length(F.col(TEXT)) > LONG_TEXT, 1).otherwise(0)).alias("long"),
        F.first(F.when(F.col(TEXT).contains("\ufffd"), F.substring(F.col(TEXT), 1, 60)), ignorenulls=True).alias("bad"),
    ).first()
    rows, empty, nolabel = row["rows"], row["empty"] or 0, row["nolabel"] or 0
    if rows == 0:
        raise InputError(f"the {what} holds no rows: check data.source")
    if row["undecodable"]:
        raise InputError(
            f"{row['undecodable']} rows of the {what} hold bytes that are not valid UTF-8 (e.g. {row['bad']!r}): "
            "convert the file to UTF-8, or set data.encoding (e.g. latin-1) for CSV and JSON files"
        )
    if row["long"]:
        log.warning("%s: %d texts are longer than %d characters; they are clipped before tokenizing "
                    "(max_length tokens need far fewer characters)", what, row["long"], LONG_TEXT)
    if empty or nolabel:
        log.warning("%s: dropped %d rows with null or empty text and %d without a label (of %d)",
                    what, empty, nolabel, rows)
    if dropped is not None:
        dropped[what] = {"rows_read": rows, "null_or_empty_text": empty, "no_label": nolabel}
    cleaned = clean(df)
    if rows - (empty + nolabel) <= 0 and cleaned.limit(1).count() == 0:
        raise InputError(
            f"no rows left in the {what} after dropping {empty} null or empty texts and {nolabel} null labels: "
            "check data.text_column and data.label_column"
        )
    return cleaned


# ----------------------------------------------------------------------------------------------------
# Numeric targets (regression)


@dataclass(frozen=True)
class TargetScale:
    """How targets were standardized for training: value = standardized x std + mean."""

    mean: float
    std: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}


def check_targets(df: DataFrame, setting: str) -> DataFrame:
    """`label` must be a number in every row: lists, strings, nulls, NaN and infinities are refused, with the
    row count and an example. Returns `df` with `label` as double."""
    dtype = df.schema[LABEL].dataType
    if isinstance(dtype, T.ArrayType):
        raise InputError(f"{setting} holds lists ({dtype.simpleString()}), but task regression takes one number "
                         "per row: use task: multilabel_classification for lists of labels, or pick a numeric column")
    if not isinstance(dtype, T.NumericType):
        example = df.where(F.col(LABEL).isNotNull()).select(F.col(LABEL).cast("string")).first()
        raise InputError(f"{setting} holds {dtype.simpleString()} values (e.g. {example[0] if example else None!r}), "
                         "but task regression needs numbers: cast the column to a number, or use task: classification")
    value = F.col(LABEL).cast("double")
    bad = F.col(LABEL).isNull() | F.isnan(value) | (F.abs(value) == float("inf"))
    row = df.agg(F.sum(bad.cast("int")).alias("bad"), F.count(F.lit(1)).alias("rows"),
                 F.first(F.when(bad, F.coalesce(F.col(LABEL).cast("string"), F.lit("null"))), ignorenulls=True).alias("example")).first()
    if row["bad"]:
        raise InputError(f"{setting}: {row['bad']} of {row['rows']} rows have no usable target (null, NaN or "
                         f"infinite; e.g. {row['example']!r}): drop or fix those rows before training")
    return df.withColumn(LABEL, value)


def target_scale(df: DataFrame, setting: str) -> TargetScale:
    """Mean and standard deviation of the training targets; a constant target is refused."""
    row = df.agg(F.avg(LABEL).alias("mean"), F.stddev_pop(LABEL).alias("std"), F.min(LABEL).alias("lo")).first()
    if not row["std"] or row["std"] <= 1e-12:
        raise InputError(f"{setting}: every training row has the same target ({row['lo']!r}): there is nothing to "
                         "learn; check the column, or the data.train_limit sample")
    return TargetScale(float(row["mean"]), float(row["std"]))


def prepare_targets(spark: SparkSession, cfg: DataConfig, seed: int) -> tuple[Prepared, TargetScale]:
    """Source -> checked `text` / `label` (double) DataFrames, split and sampled, and the training targets'
    scale. Rows with empty text are dropped as for classification; a bad target is refused instead (a
    dropped target would silently change what the model learns)."""
    setting = f"data.label_column = {cfg.label_column!r}"
    raw, _ = read_source(spark, cfg.source, cfg.format, cfg.train_split, cfg.encoding, cfg.version)
    df = check_targets(select_columns(raw, cfg.text_column, cfg.label_column, cfg.text_pair_column), setting)
    dropped: dict[str, dict] = {}
    df = clean_and_count(df, "source", dropped)
    if cfg.eval_source or cfg.eval_split:
        raw_eval, _ = read_source(spark, cfg.eval_source or cfg.source, cfg.format, cfg.eval_split, cfg.encoding)
        eval_df = clean_and_count(check_targets(select_columns(raw_eval, cfg.text_column, cfg.label_column, cfg.text_pair_column),
                                                 setting + " (validation source)"), "validation source", dropped)
        train_df = df
    else:
        train_df, eval_df = split(df, cfg.validation_fraction, seed)
    train_df, eval_df, counts = sampled(train_df, eval_df, cfg, seed, dropped)
    scale = target_scale(train_df, setting)
    log.info("data: %d training rows, %d validation rows, target mean %.4g, std %.4g",
             counts["train_rows"], counts["eval_rows"], scale.mean, scale.std)
    return Prepared(train_df, eval_df, LabelInfo(("value",), False), counts), scale


# ----------------------------------------------------------------------------------------------------
# Label lists (multilabel_classification)


def label_lists(df: DataFrame, separator: Optional[str], setting: str) -> DataFrame:
    """`label` as array<string>: a list column as it is (names or ids), or one string split at `separator`
    (blank parts dropped, so "" is the empty list). A single label per row is refused."""
    dtype = df.schema[LABEL].dataType
    if isinstance(dtype, T.ArrayType):
        if not isinstance(dtype.elementType, (T.StringType, T.IntegralType)):
            raise InputError(f"{setting} holds {dtype.simpleString()}: the lists must hold label names or integer ids")
        return df.withColumn(LABEL, F.transform(F.col(LABEL), lambda x: F.trim(x.cast("string"))))
    if isinstance(dtype, T.StringType) and separator:
        parts = F.transform(F.split(F.col(LABEL), re_escape(separator)), lambda x: F.trim(x))
        return df.withColumn(LABEL, F.when(F.col(LABEL).isNull(), None).otherwise(F.filter(parts, lambda x: x != "")))
    example = df.where(F.col(LABEL).isNotNull()).select(F.col(LABEL).cast("string")).first()
    raise InputError(
        f"{setting} holds one {dtype.simpleString()} per row (e.g. {example[0] if example else None!r}), but task "
        "multilabel_classification needs a list of labels per row: give a list column, set data.label_separator "
        "(e.g. ',') for labels joined in one string, or use task: classification for one label per row")


def re_escape(separator: str) -> str:
    """`separator` as a Java regular expression that matches it literally (F.split takes a pattern)."""
    import re

    return re.escape(separator)


def label_vocabulary(train: DataFrame, other: DataFrame, label_names: Optional[list[str]],
                     setting: str) -> tuple[tuple[str, ...], bool]:
    """The label names in id order (data.label_names, else integer ids 0..max, else sorted names), and whether
    the data holds ids rather than names. Refuses labels outside data.label_names, ids out of range, and a
    label that never occurs in the training split."""
    def counts(df: DataFrame) -> dict[str, int]:
        rows = df.select(F.explode(LABEL).alias("l")).groupBy("l").count().collect()
        return {r["l"]: r["count"] for r in rows}

    seen_train, seen_other = counts(train), counts(other)
    values = set(seen_train) | set(seen_other)
    if len(values) > 10_000:
        raise InputError(f"{setting} holds more than 10,000 distinct labels: is it the right column?")
    ids = bool(values) and all(_is_int(v) for v in values)
    if label_names:
        names = list(label_names)
    elif ids:
        names = [str(i) for i in range(max(int(v) for v in values) + 1)]
    else:
        names = sorted(values)
    if ids:
        bad = sorted((v for v in values if not 0 <= int(v) < len(names)), key=int)
        if bad:
            raise InputError(f"{setting}: label ids {bad[:5]} are out of range for data.label_names ({len(names)} "
                             f"names, ids 0..{len(names) - 1}): fix the data or list every label")
    else:
        unknown = sorted(values - set(names))
        if unknown:
            rows = sum(seen_train.get(u, 0) + seen_other.get(u, 0) for u in unknown)
            raise InputError(f"{setting}: labels {unknown[:5]} ({rows} occurrences) are not in data.label_names = "
                             f"{names}: add them, or fix the data")
    missing = [n for i, n in enumerate(names) if seen_train.get(str(i) if ids else n, 0) == 0]
    if missing:
        raise InputError(f"{setting}: labels {missing[:5]} never occur in the training split "
                         f"({sum(seen_train.values())} labels in {train.count()} rows): a label the model never "
                         "sees cannot be learnt; add rows with it, or drop it from data.label_names")
    if len(names) < 2:
        raise InputError(f"{setting}: only one label ({names[0]!r}) occurs: use task: classification, or add labels")
    return tuple(names), ids


def multi_hot(df: DataFrame, names: tuple[str, ...], by_id: bool) -> DataFrame:
    """`label` (array<string> of names, or of ids when `by_id`) -> array<float> of len(names): 1 where present."""
    keys = [str(i) for i in range(len(names))] if by_id else list(names)
    return df.withColumn(LABEL, F.array(*[F.array_contains(F.col(LABEL), k).cast("float") for k in keys]))


def prepare_label_lists(spark: SparkSession, cfg: DataConfig, seed: int) -> tuple[Prepared, dict[str, dict[str, int]]]:
    """Source -> `text` / `label` (multi-hot array<float>) DataFrames, split and sampled, and each label's row
    count in train and validation."""
    setting = f"data.label_column = {cfg.label_column!r}"
    raw, _ = read_source(spark, cfg.source, cfg.format, cfg.train_split, cfg.encoding, cfg.version)
    dropped: dict[str, dict] = {}
    df = clean_and_count(label_lists(select_columns(raw, cfg.text_column, cfg.label_column, cfg.text_pair_column), cfg.label_separator,
                                      setting), "source", dropped)
    if cfg.eval_source or cfg.eval_split:
        raw_eval, _ = read_source(spark, cfg.eval_source or cfg.source, cfg.format, cfg.eval_split, cfg.encoding)
        eval_df = clean_and_count(label_lists(select_columns(raw_eval, cfg.text_column, cfg.label_column, cfg.text_pair_column),
                                               cfg.label_separator, setting), "validation source", dropped)
        train_df = df
    else:
        train_df, eval_df = split(df, cfg.validation_fraction, seed)
    train_df, eval_df, counts = sampled(train_df, eval_df, cfg, seed, dropped)
    names, by_id = label_vocabulary(train_df, eval_df, cfg.label_names, setting)
    train_hot, eval_hot = multi_hot(train_df, names, by_id), multi_hot(eval_df, names, by_id)
    frequency = {split_name: dict(zip(names, [int(x) for x in _column_sums(d, len(names))]))
                 for split_name, d in (("train", train_hot), ("validation", eval_hot))}
    log.info("data: %d training rows, %d validation rows, %d labels", counts["train_rows"], counts["eval_rows"], len(names))
    return Prepared(train_hot, eval_hot, LabelInfo(names, not by_id), counts), frequency


def _column_sums(df: DataFrame, n: int) -> list[float]:
    row = df.agg(*[F.sum(F.col(LABEL)[i]).alias(f"c{i}") for i in range(n)]).first()
    return [float(row[f"c{i}"] or 0) for i in range(n)]
