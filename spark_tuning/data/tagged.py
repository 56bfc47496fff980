"""Tagged text in Spark (task token_classification): read, check, split and encode the gold tags.

Two shapes of row:
  words   data.text_column holds a list of words and data.label_column a list of tags of the same length
          (the CoNLL shape; BIO / IOB2 tags: "O", "B-PER", "I-PER"). The text is the words joined by single
          spaces, and each word is a unit (text/token_spans.py).
  spans   data.text_column holds the text and data.label_column a list of character spans
          [{start, end, label}] (end exclusive; an empty list is a row without entities). Each sub-word token
          is a unit.
Every check runs as one aggregate and names the count and an example of the bad value before any training.
After `prepare_tagged` a DataFrame has `text` (string) and `gold`: the tag id of each word (words), or the
entities' (start, end, type id) triples one after another (spans).
"""

from __future__ import annotations

import logging
from typing import Optional, TYPE_CHECKING

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_tuning.data import dataset
from spark_tuning.data.dataset import LABEL, TEXT, LabelInfo, Prepared
from spark_tuning.errors import InputError

if TYPE_CHECKING:
    from spark_tuning.config import DataConfig

log = logging.getLogger(__name__)

GOLD = "gold"
TAG = r"^(O|[BI]-.+)$"
SPAN_FIELDS = ("start", "end", "label")


def tagged_columns(df: DataFrame, text_column: str, label_column: str) -> tuple[DataFrame, str]:
    """`text` and `label` (tags or spans) and the unit ("word" or "token") the shape of the columns says."""
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise InputError(f"data.text_column / data.label_column: no column {missing} in the data; it has "
                         f"{df.columns}: set the column names in data:")
    text_t, label_t = df.schema[text_column].dataType, df.schema[label_column].dataType
    words = isinstance(text_t, T.ArrayType) and isinstance(text_t.elementType, T.StringType)
    tags = isinstance(label_t, T.ArrayType) and isinstance(label_t.elementType, T.StringType)
    spans = isinstance(label_t, T.ArrayType) and isinstance(label_t.elementType, T.StructType)
    where = f"data.text_column = {text_column!r} ({text_t.simpleString()}), data.label_column = {label_column!r} " \
            f"({label_t.simpleString()})"
    if words and tags:
        return df.select(F.col(text_column).alias(TEXT), F.col(label_column).alias(LABEL)), "word"
    if isinstance(text_t, T.StringType) and spans:
        fields = set(label_t.elementType.fieldNames())
        if not set(SPAN_FIELDS) <= fields:
            raise InputError(f"{where}: each span needs the fields start, end and label; these have {sorted(fields)}: "
                             "rename the fields, e.g. [{start: 0, end: 5, label: 'PER'}]")
        spans_col = F.transform(F.col(label_column), lambda s: F.struct(
            s["start"].cast("int").alias("start"), s["end"].cast("int").alias("end"),
            F.trim(s["label"].cast("string")).alias("label")))
        return df.select(F.col(text_column).alias(TEXT), spans_col.alias(LABEL)), "token"
    if words:
        fix = "a list of tags of the same length per row (CoNLL shape)"
    elif isinstance(text_t, T.StringType) and tags:
        fix = ("character spans [{start, end, label}] for a text, or the words as a list column beside the list of "
               "tags (CoNLL shape)")
    elif isinstance(text_t, T.StringType):
        fix = ("a list of tags per word (with the words as a list column) or a list of character spans [{start, end, "
               "label}]; for one label per row use task: classification")
    else:
        fix = "data.text_column as a list of words (with a list of tags) or as a text (with character spans)"
    raise InputError(f"{where}: task token_classification needs {fix}")


def check_words(df: DataFrame, setting: str) -> DataFrame:
    """Words and tags of the same length, words without white space, tags in BIO form; then `text` is the
    words joined by spaces and `label` the tags."""
    bad_len = F.size(TEXT) != F.size(LABEL)
    bad_word = F.exists(TEXT, lambda w: w.isNull() | (w == "") | w.rlike(r"\s"))
    bad_tag = F.exists(LABEL, lambda t: t.isNull() | ~t.rlike(TAG))
    row = df.where(F.col(TEXT).isNotNull() & F.col(LABEL).isNotNull()).agg(
        F.sum(bad_len.cast("int")).alias("len"),
        F.first(F.when(bad_len, F.concat_ws(" ", F.slice(TEXT, 1, 6))), ignorenulls=True).alias("len_ex"),
        F.first(F.when(bad_len, F.concat(F.size(TEXT).cast("string"), F.lit(" words, "),
                                         F.size(LABEL).cast("string"), F.lit(" tags"))), ignorenulls=True).alias("len_n"),
        F.sum(bad_word.cast("int")).alias("word"),
        F.first(F.when(bad_word, F.filter(TEXT, lambda w: w.isNull() | (w == "") | w.rlike(r"\s"))[0]),
                ignorenulls=True).alias("word_ex"),
        F.sum(bad_tag.cast("int")).alias("tag"),
        F.first(F.when(bad_tag, F.filter(LABEL, lambda t: t.isNull() | ~t.rlike(TAG))[0]), ignorenulls=True).alias("tag_ex"),
    ).first()
    problems = []
    if row["len"]:
        problems.append(f"{row['len']} rows have words and tags of different lengths (e.g. {row['len_n']}: "
                        f"{row['len_ex']!r}): give one tag per word")
    if row["word"]:
        problems.append(f"{row['word']} rows hold a word that is empty or holds white space (e.g. {row['word_ex']!r}): "
                        "split it into words, or drop it with its tag")
    if row["tag"]:
        problems.append(f"{row['tag']} rows hold a tag that is not O, B-<type> or I-<type> (e.g. {row['tag_ex']!r}): "
                        "use BIO / IOB2 tags")
    if problems:
        raise InputError(f"{setting}: " + "; ".join(problems))
    return df.withColumn(TEXT, F.array_join(TEXT, " "))


def check_spans(df: DataFrame, setting: str) -> DataFrame:
    """Spans inside their text, not empty, not overlapping, with a label."""
    outside = F.exists(LABEL, lambda s: s["start"].isNull() | s["end"].isNull() | (s["start"] < 0)
                       | (s["end"] > F.length(TEXT)) | (s["start"] >= s["end"]))
    unlabelled = F.exists(LABEL, lambda s: s["label"].isNull() | (s["label"] == ""))
    ordered = F.array_sort(LABEL)  # by start, then end
    overlap = F.exists(F.sequence(F.lit(1), F.greatest(F.size(ordered) - 1, F.lit(1))),
                       lambda i: (i < F.size(ordered)) & (ordered[i]["start"] < ordered[i - 1]["end"]))
    show = lambda s: F.concat(F.lit("{start: "), s["start"].cast("string"), F.lit(", end: "),  # noqa: E731
                              s["end"].cast("string"), F.lit(", label: "), s["label"], F.lit("}"))
    row = df.where(F.col(TEXT).isNotNull() & F.col(LABEL).isNotNull()).agg(
        F.sum(outside.cast("int")).alias("out"),
        F.first(F.when(outside, F.concat(F.concat_ws(", ", F.transform(LABEL, show)), F.lit(" in a text of "),
                                         F.length(TEXT).cast("string"), F.lit(" characters"))),
                ignorenulls=True).alias("out_ex"),
        F.sum(overlap.cast("int")).alias("overlap"),
        F.first(F.when(overlap, F.concat_ws(", ", F.transform(ordered, show))), ignorenulls=True).alias("overlap_ex"),
        F.sum(unlabelled.cast("int")).alias("unlabelled"),
    ).first()
    problems = []
    if row["out"]:
        problems.append(f"{row['out']} rows have a span outside its text or empty (e.g. {row['out_ex']}): spans are "
                        "character offsets 0 <= start < end <= len(text), end exclusive")
    if row["overlap"]:
        problems.append(f"{row['overlap']} rows have overlapping spans (e.g. {row['overlap_ex']}): a character "
                        "belongs to one entity at most; keep one of each overlapping pair")
    if row["unlabelled"]:
        problems.append(f"{row['unlabelled']} rows have a span without a label: give every span its type")
    if problems:
        raise InputError(f"{setting}: " + "; ".join(problems))
    return df


def entity_types(df: DataFrame, unit: str) -> dict[str, int]:
    """Each entity type and how often it occurs (as B-/I- runs are not counted here: tags or spans)."""
    if unit == "word":
        types = F.explode(F.filter(F.transform(LABEL, lambda t: F.regexp_extract(t, r"^B-(.+)$", 1)), lambda t: t != ""))
    else:
        types = F.explode(F.transform(LABEL, lambda s: s["label"]))
    return {r["t"]: r["count"] for r in df.select(types.alias("t")).groupBy("t").count().collect()}


def vocabulary(train: DataFrame, other: DataFrame, unit: str, label_names: Optional[list[str]], setting: str) -> list[str]:
    """The entity types in id order (data.label_names, else sorted); refuses types outside label_names and a
    type that never occurs in training."""
    seen_train, seen_other = entity_types(train, unit), entity_types(other, unit)
    seen = set(seen_train) | set(seen_other)
    names = list(label_names) if label_names else sorted(seen)
    unknown = sorted(seen - set(names))
    if unknown:
        n = sum(seen_train.get(u, 0) + seen_other.get(u, 0) for u in unknown)
        raise InputError(f"{setting}: entity types {unknown[:5]} ({n} entities) are not in data.label_names = {names}: "
                         "add them, or fix the data")
    missing = [n for n in names if not seen_train.get(n)]
    if missing:
        raise InputError(f"{setting}: entity types {missing[:5]} never occur in the training split (of "
                         f"{sum(seen_train.values())} entities there): a type the model never sees cannot be learnt; "
                         "add rows with it, or drop it from data.label_names")
    if not names:
        raise InputError(f"{setting}: the data holds no entities at all: check data.label_column")
    return names


def with_gold(df: DataFrame, unit: str, types: list[str]) -> DataFrame:
    """`label` -> `gold` (array<int>): tag ids per word, or (start, end, type id) triples per span."""
    from spark_tuning.text.token_spans import tag_names

    if unit == "word":
        ids = F.create_map(*[x for i, n in enumerate(tag_names(types)) for x in (F.lit(n), F.lit(i))])
        gold = F.transform(LABEL, lambda t: F.element_at(ids, t))
    else:
        ids = F.create_map(*[x for i, n in enumerate(types) for x in (F.lit(n), F.lit(i))])
        gold = F.flatten(F.transform(LABEL, lambda s: F.array(s["start"], s["end"], F.element_at(ids, s["label"]))))
    return df.withColumn(GOLD, gold.cast("array<int>")).drop(LABEL)


def _read(spark: SparkSession, cfg: DataConfig, source: str, split: Optional[str], what: str,
          dropped: dict[str, dict]) -> tuple[DataFrame, str]:
    setting = f"data.label_column = {cfg.label_column!r}"
    raw, _ = dataset.read_source(spark, source, cfg.format, split, cfg.encoding,
                                 cfg.version if source == cfg.source else None)
    df, unit = tagged_columns(raw, cfg.text_column, cfg.label_column)
    df = check_words(df, setting) if unit == "word" else check_spans(df, setting)
    return dataset.clean_and_count(df, what, dropped), unit


def prepare_tagged(spark: SparkSession, cfg: DataConfig, seed: int) -> tuple[Prepared, str, dict]:
    """Source -> `text` / `gold` DataFrames, split and sampled; the unit; entities per type in train and
    validation."""
    setting = f"data.label_column = {cfg.label_column!r}"
    dropped: dict[str, dict] = {}
    df, unit = _read(spark, cfg, cfg.source, cfg.train_split, "source", dropped)
    if cfg.eval_source or cfg.eval_split:
        eval_df, eval_unit = _read(spark, cfg, cfg.eval_source or cfg.source, cfg.eval_split, "validation source", dropped)
        if eval_unit != unit:
            raise InputError(f"{setting}: the training rows hold {unit}s with tags and the validation rows the other "
                             "shape: give both sources the same columns")
        train_df = df
    else:
        train_df, eval_df = dataset.split(df, cfg.validation_fraction, seed)
    train_df, eval_df, counts = dataset.sampled(train_df, eval_df, cfg, seed, dropped)
    types = vocabulary(train_df, eval_df, unit, cfg.label_names, setting)
    frequency = {name: entity_types(d, unit) for name, d in (("train", train_df), ("validation", eval_df))}
    log.info("data: %d training rows, %d validation rows, entity types %s (%s units)", counts["train_rows"],
             counts["eval_rows"], types, unit)
    prepared = Prepared(with_gold(train_df, unit, types), with_gold(eval_df, unit, types), LabelInfo(tuple(types), True),
                        counts)
    return prepared, unit, frequency
