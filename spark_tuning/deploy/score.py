"""Batch scoring in Spark with the logged MLflow model.

`score(df, model_path)` is a pure DataFrame -> DataFrame transform: it adds `prediction` (the label),
`probability` (of that label) and `probabilities` (every class, by label id) for a model that answers
labels, `prediction` (the list of labels) and `probabilities` for a multi-label model, `prediction` (a
double) for a regression model, or `prediction` (a list of entities: label, start, end, text, score) for a
token classification model, with an iterator pandas UDF. Which, it reads
from the model's signature.
The UDF loads the model once per executor Python process (cached at module level; Spark reuses its Python
workers between tasks) and scores each Arrow batch. `model_path` must be readable on every executor:
`localize` downloads a models:/ or runs:/ URI once on the driver and ships it with SparkContext.addFile.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import Iterator, Optional, Tuple

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from spark_tuning.errors import InputError

log = logging.getLogger("spark_tuning.score")

# What the model answers (its signature's outputs) -> the columns score adds: (Spark schema, served column
# of each added column).
LABELS = ("prediction string, probability double, probabilities array<double>",
          {"prediction": "label", "probability": "probability", "probabilities": "probabilities"})
NUMBER = ("prediction double", {"prediction": "prediction"})
LABEL_SETS = ("prediction array<string>, probabilities array<double>",
              {"prediction": "labels", "probabilities": "probabilities"})
ENTITIES = ("prediction array<struct<label:string, start:bigint, end:bigint, text:string, score:double>>",
            {"prediction": "entities"})
_MODELS: dict = {}  # per executor Python process: model location -> loaded pyfunc model


def _load_once(location: str):
    """The model for `location`, loaded on first use in this Python process."""
    if location not in _MODELS:
        import mlflow.pyfunc

        _MODELS[location] = mlflow.pyfunc.load_model(_model_path(location))
    return _MODELS[location]


def localize(spark: SparkSession, model_uri: str, tracking_uri: Optional[str], download_dir: str) -> str:
    """Download the model once on the driver (into `download_dir`, which the caller removes when the job is
    done: `spark-tuning score` passes a temporary folder it deletes) and ship it to the executors; returns
    the location for `score`."""
    import mlflow
    from mlflow.artifacts import download_artifacts

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if model_uri.startswith("models:/") and not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise InputError(f"--model-uri {model_uri} names a registered model, but no tracking URI is set: pass "
                         "--tracking-uri (e.g. sqlite:///outputs/mlflow.db) or set MLFLOW_TRACKING_URI")
    # A fresh name each time: Spark refuses a second file of the same name with another path.
    target = os.path.join(download_dir, f"model-{uuid.uuid4().hex[:8]}")
    if os.path.isdir(model_uri):
        local = shutil.copytree(model_uri, target)
    else:
        local = download_artifacts(artifact_uri=model_uri, dst_path=target)
    if not os.path.isfile(os.path.join(local, "MLmodel")):
        raise InputError(f"{model_uri} is not an MLflow model (no MLmodel file in {local})")
    answer_kind(local, model_uri)
    spark.sparkContext.addFile(local, recursive=True)
    return "sparkfiles:" + os.path.basename(local.rstrip("/"))


def answer_kind(local: str, model_uri: str) -> tuple[str, dict]:
    """LABELS, LABEL_SETS (multilabel), NUMBER or ENTITIES (token classification), from the model's signature; a text-generation model is refused (score adds
    prediction columns)."""
    from mlflow.models import Model

    outputs = Model.load(local).signature
    names = outputs.outputs.input_names() if outputs is not None and outputs.outputs is not None else []
    if not names or "label" in names:
        return LABELS
    if names == ["prediction"]:
        return NUMBER
    if "labels" in names:
        return LABEL_SETS
    if names == ["entities"]:
        return ENTITIES
    raise InputError(f"{model_uri} answers {names}, not labels or a number: score adds prediction columns, so it "
                     "takes classification, regression and token classification models (and sft models trained on classification data)")


def _model_path(location: str) -> str:
    if location.startswith("sparkfiles:"):
        from pyspark import SparkFiles

        return SparkFiles.get(location[len("sparkfiles:"):])
    return location


def text_limit(local: str) -> int:
    """The served model's limit on characters per text (deploy.max_text_chars, in its model_config)."""
    from mlflow.models import Model

    config = Model.load(local).flavors.get("python_function", {}).get("model_config") or {}
    return int(config.get("max_chars", 100_000))


def clip(texts: pd.Series, limit: int) -> pd.Series:
    """Texts over `limit` characters keep their first and last limit // 2 (any truncation mode then finds the
    tokens it keeps: max_length tokens need far fewer characters), as training clips what it cannot use."""
    half = limit // 2
    long = texts.str.len() > limit
    if long.any():
        texts = texts.where(~long, texts.str.slice(0, half) + " " + texts.str.slice(-(limit - half - 1)))
    return texts


def clipped_rows(df: DataFrame, model_location: str, text_column: str = "text") -> int:
    """How many rows of `df` score clips (texts over the model's limit)."""
    limit = text_limit(_model_path(model_location))
    return df.where(F.length(F.col(text_column)) > limit).count()


def takes_pairs(local: str) -> bool:
    """Whether the model was trained on text pairs (its signature's inputs hold text_pair)."""
    from mlflow.models import Model

    sig = Model.load(local).signature
    return sig is not None and sig.inputs is not None and "text_pair" in sig.inputs.input_names()


def score(df: DataFrame, model_location: str, text_column: str = "text", pair_column: str = "text_pair") -> DataFrame:
    """`df` plus the prediction columns (see the module), scored by the model at `model_location`
    (`pair_column`: the second text, for a model trained on text pairs)."""
    if text_column not in df.columns:
        raise InputError(f"the input has no {text_column!r} column (columns: {df.columns}): pass --text-column")
    schema, columns = answer_kind(_model_path(model_location), model_location)
    pairs = takes_pairs(_model_path(model_location))
    if pairs and pair_column not in df.columns:
        raise InputError(f"{model_location} compares two texts, and the input has no {pair_column!r} column "
                         f"(columns: {df.columns}): pass --text-pair-column")
    clash = [c for c in columns if c in df.columns]
    if clash:
        raise InputError(f"the input already has column(s) {clash}: rename or drop them before scoring")
    limit = text_limit(_model_path(model_location))  # one text over it would fail the whole Spark job

    @pandas_udf(schema)
    def predict(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        model = _load_once(model_location)
        for texts in batches:
            out = model.predict(pd.DataFrame({"text": clip(texts.fillna("").astype(str), limit)}))
            yield pd.DataFrame({name: out[served] for name, served in columns.items()})

    @pandas_udf(schema)
    def predict_pairs(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        model = _load_once(model_location)
        for texts, second in batches:
            out = model.predict(pd.DataFrame({"text": clip(texts.fillna("").astype(str), limit),
                                              "text_pair": clip(second.fillna("").astype(str), limit)}))
            yield pd.DataFrame({name: out[served] for name, served in columns.items()})

    udf = predict_pairs(F.col(text_column), F.col(pair_column)) if pairs else predict(F.col(text_column))
    scored = df.withColumn("_scored", udf)
    return scored.select(*df.columns, *[F.col(f"_scored.{c}").alias(c) for c in columns])


def read_input(spark: SparkSession, source: str) -> DataFrame:
    """A table name or a path (Parquet, JSON Lines, CSV, Delta), by the same rules as the job's data."""
    from spark_tuning.data.dataset import infer_format, read_source

    return read_source(spark, source, infer_format(source))[0]


def check_spark_output(target: str) -> None:
    """--overwrite replaces only a Parquet output as Spark writes it (part files, _SUCCESS, checksums), never a
    folder that holds anything else or holds what matters (the working directory, home, the checkout)."""
    from spark_tuning.paths import check_removable

    check_removable(target, f"--output {target}")
    if not os.path.isdir(target):
        raise InputError(f"--output {target} is a file: score writes a Parquet folder; choose another path")
    foreign = [n for n in sorted(os.listdir(target))
               if not (n.startswith(("part-", ".part-")) or n in ("_SUCCESS", "._SUCCESS.crc") or n.startswith("_committed")
                       or n.startswith("_started"))]
    if foreign:
        raise InputError(f"--output {target} holds files that Spark's Parquet writer did not write ({', '.join(foreign[:5])}): "
                         "it is not replaced, with or without --overwrite; choose another path")


def write_output(df: DataFrame, target: str, overwrite: bool) -> None:
    """A path gets Parquet; a name without slashes is a table."""
    mode = "overwrite" if overwrite else "errorifexists"
    if "/" in target or target.startswith("."):
        if os.path.exists(target) and not overwrite:
            raise InputError(f"--output {target} already exists: pass --overwrite or choose another path")
        if os.path.exists(target):
            check_spark_output(target)
        df.write.mode(mode).parquet(target)
    else:
        df.write.mode(mode).saveAsTable(target)
