"""Delta tables as data.source without Spark's Delta connector (this pip pyspark has none): the snapshot's
files listed by delta-rs (`deltalake`) and read by Spark. Tables are written here with `deltalake`: several
commits, a delete, a schema change, partitions, time travel; and tables the path cannot honour, refused.
(The connector path, `format("delta")` and catalog tables, needs delta-spark's jars: not on this machine.)"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

deltalake = pytest.importorskip("deltalake", reason="the deltalake package reads Delta tables without the connector")

from spark_tuning.data import dataset  # noqa: E402
from spark_tuning.data.delta import has_connector  # noqa: E402
from spark_tuning.errors import InputError  # noqa: E402


def _rows(start: int, n: int, **extra) -> pd.DataFrame:
    return pd.DataFrame({"id": range(start, start + n), "text": [f"review {i}" for i in range(start, start + n)],
                         "label": [i % 2 for i in range(start, start + n)], **extra})


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Version 0: 1,000 rows; 1: 1,000 more; 2: rows 0-99 deleted; 3: 50 rows with a new column."""
    from deltalake import DeltaTable, write_deltalake

    path = str(tmp_path_factory.mktemp("delta") / "reviews")
    write_deltalake(path, _rows(0, 1000))
    write_deltalake(path, _rows(1000, 1000), mode="append")
    DeltaTable(path).delete("id < 100")
    write_deltalake(path, _rows(2000, 50, source=["new"] * 50), mode="append", schema_mode="merge")
    return path


def _expected(version: int) -> pd.DataFrame:
    rows = _rows(0, 1000) if version == 0 else pd.concat([_rows(0, 1000), _rows(1000, 1000)])
    if version >= 2:
        rows = rows[rows.id >= 100]
    if version >= 3:
        rows = pd.concat([rows, _rows(2000, 50, source=["new"] * 50)])
    return rows


def test_this_session_has_no_connector(spark):
    assert not has_connector(spark)  # so the tests below take the delta-rs path


@pytest.mark.parametrize("version", [None, 0, 1, 2])
def test_every_version_reads_as_its_snapshot(spark, table, version):
    df, _ = dataset.read_source(spark, table, "auto", version=version)  # auto: a _delta_log folder
    got = df.toPandas().sort_values("text").reset_index(drop=True)
    want = _expected(3 if version is None else version).sort_values("text").reset_index(drop=True)
    assert got["text"].tolist() == want["text"].tolist() and got["label"].tolist() == want["label"].tolist()
    if version is None:  # the added column: null in the files written before it
        assert got["source"].notna().sum() == 50
    assert df.rdd.getNumPartitions() >= 1  # a Spark read of the files, not a driver-side table


def test_partition_values_come_back_as_columns(spark, tmp_path):
    from deltalake import write_deltalake

    path = str(tmp_path / "by-lang")
    write_deltalake(path, _rows(0, 40, lang=["en", "fr"] * 20), partition_by=["lang"])
    got = dataset.read_source(spark, path, "delta")[0].toPandas()
    assert sorted(got.columns) == ["id", "label", "lang", "text"] and (got.lang == "en").sum() == 20
    assert set(got[got.lang == "fr"].text) == {f"review {i}" for i in range(1, 40, 2)}


def test_the_job_trains_from_a_delta_table_at_a_version(spark, table, tmp_path, tiny_bert_dir):
    from conftest import tiny_job_config
    from spark_tuning import finetune

    cfg = tiny_job_config(tmp_path, table, tiny_bert_dir, **{"data.version": 2, "train.epochs": 1,
                                                              "data.label_names": "[neg, pos]"})
    summary = finetune.run(cfg, spark=spark)
    from mlflow import MlflowClient

    params = MlflowClient(summary.tracking_uri).get_run(summary.run_id).data.params
    # Version 2: the 1,900 rows left after the delete, split into training and validation rows.
    assert int(params["derived.train_rows"]) + summary.metrics["num_examples"] == len(_expected(2)) == 1900


def _with_protocol(path: str, protocol: dict, configuration: dict | None = None) -> None:
    """A next commit that changes the protocol (and metadata), as a Delta writer with that feature would."""
    log = os.path.join(path, "_delta_log")
    version = max(int(n.split(".")[0]) for n in os.listdir(log) if n.endswith(".json")) + 1
    actions = [{"protocol": protocol}]
    if configuration:
        first = json.loads(next(ln for ln in open(os.path.join(log, f"{0:020d}.json")) if '"metaData"' in ln))
        first["metaData"]["configuration"] = configuration
        schema = json.loads(first["metaData"]["schemaString"])
        for i, field in enumerate(schema["fields"], start=1):  # what a column-mapping writer records per field
            field["metadata"] = {"delta.columnMapping.id": i, "delta.columnMapping.physicalName": field["name"]}
        first["metaData"]["schemaString"] = json.dumps(schema)
        actions.append(first)
    with open(os.path.join(log, f"{version:020d}.json"), "w") as f:
        f.write("".join(json.dumps(a) + "\n" for a in actions))


@pytest.mark.parametrize("feature, expect", [
    ("deletionVectors", "deletionVectors (deleted rows are marked in deletion vectors"),
    ("columnMapping", "columnMapping (columns are renamed or dropped through column mapping"),
])
def test_tables_the_files_alone_cannot_honour_are_refused(spark, tmp_path, feature, expect):
    from deltalake import write_deltalake

    path = str(tmp_path / feature)
    write_deltalake(path, _rows(0, 10))
    config = {"delta.columnMapping.mode": "name", "delta.columnMapping.maxColumnId": "3"} if feature == "columnMapping" else None
    _with_protocol(path, {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": [feature],
                          "writerFeatures": [feature]}, config)
    with pytest.raises(InputError) as err:
        dataset.read_source(spark, path, "delta")
    msg = str(err.value)
    assert "read it with Spark's Delta connector" in msg and ("delta-rs" not in msg), msg
    assert expect in msg, msg


def test_bad_versions_and_names_say_what_to_do(spark, table):
    with pytest.raises(InputError, match=r"data.version = 99 may not exist"):
        dataset.read_source(spark, table, "delta", version=99)
    with pytest.raises(InputError, match="is a table name, and this Spark session has no Delta connector"):
        dataset.read_source(spark, "main.reviews", "table", version=1)
