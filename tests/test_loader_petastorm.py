"""`loader: petastorm`: the same shards and batches as the Parquet loader, and a whole job through it.

petastorm runs only with pyarrow < 15 (the legacy environment, `bash tests/run_petastorm.sh`). In the main
environment the petastorm tests skip, and what is checked is the clear error a user gets there.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_job_config


def _petastorm_missing() -> str:
    import pyarrow

    if int(pyarrow.__version__.split(".")[0]) >= 15:
        return f"petastorm needs pyarrow < 15, this environment has {pyarrow.__version__} (run tests/run_petastorm.sh)"
    try:
        import petastorm.spark  # noqa: F401
    except ImportError as e:
        return f"petastorm is not installed here ({e}); run tests/run_petastorm.sh"
    return ""


# petastorm 0.12 on pyarrow 14 warns about pyarrow's legacy APIs on every read: expected, not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning:petastorm"),
              pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning")]
needs_petastorm = pytest.mark.skipif(bool(_petastorm_missing()), reason=_petastorm_missing() or "-")
MAX_LENGTH = 24


@pytest.mark.skipif(not _petastorm_missing(), reason="petastorm works here: the refusal is for the modern stack")
def test_petastorm_with_modern_pyarrow_is_a_clear_input_error(tmp_path, reviews_jsonl):
    """Exit code 2 from the CLI, naming the pyarrow needed and the way to get it, before Spark starts."""
    out = tmp_path / "out" / "model"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "spark_tuning.cli", "finetune", "--set", "loader.kind=petastorm",
         "--set", f"output_dir={out}", "--set", f"data.source={reviews_jsonl}"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr
    assert "loader.kind = 'petastorm'" in message and "pyarrow < 15" in message
    assert "bootstrap_petastorm.sh" in message and "loader.kind: parquet" in message
    # Nothing was started or written: no Spark log lines, no staging or output folder.
    assert "SparkContext" not in message and "Spark" + "Session" not in message
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# Legacy environment only


def _tokenized(spark, n: int = 203, seed: int = 3):
    """A tokenized-looking DataFrame: variable-length `input_ids` (1..MAX_LENGTH), `length`, `label`, `text`."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, MAX_LENGTH + 1, size=n)
    lengths[:3] = [1, MAX_LENGTH, MAX_LENGTH - 1][:n]  # the edges
    rows = pd.DataFrame({
        "text": [f"review {i}" for i in range(n)],
        "label": rng.integers(0, 3, size=n).astype("int64"),
        "input_ids": [rng.integers(100, 30000, size=k).astype("int32").tolist() for k in lengths],
        "length": lengths.astype("int32"),
    })
    schema = "text string, label long, input_ids array<int>, length int"
    return spark.createDataFrame(rows, schema=schema), rows


@pytest.fixture(scope="module")
def staged_both(spark, tmp_path_factory):
    """The same DataFrame staged by both backends, as train_fn would see them (plain dict refs)."""
    from spark_tuning.loader.backends import stage_as

    tmp = tmp_path_factory.mktemp("staged")
    df, rows = _tokenized(spark)
    refs = {kind: vars(stage_as(kind, df, str(tmp / kind), 4, MAX_LENGTH)) for kind in ("parquet", "petastorm")}
    return refs, rows


@needs_petastorm
@pytest.mark.parametrize("world", [1, 2, 3])
def test_both_backends_give_the_same_shards(staged_both, world):
    from spark_tuning.loader.backends import read_shard_as

    refs, rows = staged_both
    assert refs["petastorm"]["num_rows"] == refs["parquet"]["num_rows"] == len(rows)
    seen = []
    for rank in range(world):
        a = read_shard_as("parquet", refs["parquet"], rank, world)
        b = read_shard_as("petastorm", refs["petastorm"], rank, world)
        assert len(a) > 0 and len(a) == len(b)
        assert a.rows_per_rank == b.rows_per_rank
        for name in ("row_ids", "labels", "lengths", "offsets", "values"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        # Parquet reads the bucket Spark staged; petastorm recomputes it from the lengths: the same.
        np.testing.assert_array_equal(a.bucket_keys(), b.bucket_keys(), err_msg="buckets")
        seen += list(b.row_ids)
    assert len(seen) == len(set(seen)) == len(rows)  # every row on exactly one rank


@needs_petastorm
@pytest.mark.parametrize("group_by_length, max_tokens", [(True, None), (False, None), (True, 64)])
def test_both_backends_give_the_same_batches_for_a_seed(staged_both, group_by_length, max_tokens):
    from spark_tuning.loader.batches import collate, plan_eval_batches, plan_train_batches
    from spark_tuning.loader.backends import read_shard_as

    refs, _ = staged_both
    for rank in range(2):
        a = read_shard_as("parquet", refs["parquet"], rank, 2)
        b = read_shard_as("petastorm", refs["petastorm"], rank, 2)
        for epoch in range(2):
            plan_a = plan_train_batches(a, 8, seed=7, epoch=epoch, group_by_length=group_by_length,
                                        max_tokens=max_tokens)
            plan_b = plan_train_batches(b, 8, seed=7, epoch=epoch, group_by_length=group_by_length,
                                        max_tokens=max_tokens)
            assert len(plan_a) == len(plan_b) > 3
            for ia, ib in zip(plan_a, plan_b):
                ca, cb = collate(a, ia, pad_id=0), collate(b, ib, pad_id=0)
                for key in ca:
                    np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)
        for ia, ib in zip(plan_eval_batches(a, 16), plan_eval_batches(b, 16)):
            np.testing.assert_array_equal(a.row_ids[ia], b.row_ids[ib])


@needs_petastorm
@pytest.mark.parametrize("world", [3, 4])
def test_fewer_row_groups_than_ranks(spark, tmp_path, world):
    """A tiny split (the validation rows of a small dataset) staged as fewer row groups than ranks:
    petastorm reads it (it used to raise NoDataAvailableError on the ranks that do own a group), with the
    same rows as the Parquet backend, and the ranks beyond the last group get none."""
    from spark_tuning.loader.staging import row_groups
    from spark_tuning.loader.batches import plan_eval_batches
    from spark_tuning.loader.backends import read_shard_as, stage_as

    # Fewer rows than ranks, so fewer row groups than ranks whichever files the rows hash into.
    df, rows = _tokenized(spark, n=world - 1, seed=5)
    refs = {kind: vars(stage_as(kind, df, str(tmp_path / kind), 2 * world, MAX_LENGTH))
            for kind in ("parquet", "petastorm")}
    groups = len(row_groups(refs["petastorm"]["path"]))
    assert groups == len(row_groups(refs["parquet"]["path"])) and 1 <= groups < world
    seen = []
    for rank in range(world):
        a = read_shard_as("parquet", refs["parquet"], rank, world)
        b = read_shard_as("petastorm", refs["petastorm"], rank, world)
        assert len(b) == len(a) and (len(b) > 0) == (rank < groups)
        assert a.rows_per_rank == b.rows_per_rank
        for name in ("row_ids", "labels", "lengths", "offsets", "values"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        for ia, ib in zip(plan_eval_batches(a, 2), plan_eval_batches(b, 2)):
            np.testing.assert_array_equal(a.row_ids[ia], b.row_ids[ib])
        seen += list(b.row_ids)
    assert sorted(seen) == sorted(set(seen)) and len(seen) == len(rows)


@needs_petastorm
def test_petastorm_rows_are_trimmed_to_their_true_length(staged_both):
    """Fixed-length storage, dynamic padding: each row comes back as its own tokens, and each batch is only
    as wide as its longest row (with pad id 0 in the staged data, pad with -1 here to see any leak)."""
    from spark_tuning.loader.batches import collate, plan_train_batches
    from spark_tuning.loader.backends import read_shard_as

    refs, rows = staged_both
    by_text = {t: ids for t, ids in zip(rows["text"], rows["input_ids"])}
    import pandas as pd

    texts = pd.read_parquet(refs["petastorm"]["path"], columns=["row_id", "text"]).set_index("row_id")["text"]
    widths = []
    for rank in range(2):
        shard = read_shard_as("petastorm", refs["petastorm"], rank, 2)
        for i, row_id in enumerate(shard.row_ids):
            assert shard.ids(i).tolist() == by_text[texts[row_id]]
            assert shard.lengths[i] == len(by_text[texts[row_id]])
        for index in plan_train_batches(shard, 8, seed=1, epoch=0, group_by_length=True):
            batch = collate(shard, index, pad_id=-1)
            width = batch["input_ids"].shape[1]
            assert width == shard.lengths[index].max()
            assert (batch["input_ids"] == -1).sum() == (batch["attention_mask"] == 0).sum()
            widths.append(width)
    assert min(widths) < MAX_LENGTH  # sorted-ish batches of short rows stay narrow


@needs_petastorm
def test_job_runs_end_to_end_with_petastorm(spark, tmp_path, reviews_jsonl, tiny_bert_dir):
    """The whole job through TorchDistributor (2 processes) with loader.kind = petastorm."""
    from spark_tuning import finetune

    cfg = tiny_job_config(tmp_path, reviews_jsonl, tiny_bert_dir, **{"loader.kind": "petastorm",
                                                                      "train.epochs": 4})
    summary = finetune.run(cfg, spark=spark)
    result = summary.result
    assert result["world_size"] == 2
    losses = [h["train_loss"] for h in result["history"]]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert summary.metrics["num_examples"] == 32
    assert 0 <= result["data_wait_share"] < 1 and result["shard_read_seconds"] > 0
    # The validation texts came back out of the petastorm cache (strings stay in it, unread by torch).
    import pandas as pd

    preds = pd.read_parquet(os.path.join(summary.output_dir, "eval_predictions.parquet"))
    assert len(preds) == 32 and preds["text"].str.len().min() > 0
    staging = tmp_path / "out" / ".staging"
    assert not staging.exists() or os.listdir(staging) == []  # the petastorm cache went with it
