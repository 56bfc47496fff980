"""Staging and per-rank reading: every row read once, same steps on every rank, padding per batch."""

from __future__ import annotations

import os

import numpy as np
import pytest

from spark_tuning import loader


@pytest.fixture(scope="module")
def staged(spark, tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [(int(i % 3), [int(x) for x in rng.integers(5, 100, size=int(n))], int(n))
            for i, n in enumerate(rng.integers(1, 60, size=203))]
    df = spark.createDataFrame(rows, "label int, input_ids array<int>, length int")
    return loader.stage(df, str(tmp_path_factory.mktemp("stage") / "train"), num_files=4), rows


def test_ranks_read_disjoint_shares_of_every_row(staged):
    ref, rows = staged
    assert ref.num_rows == 203
    shards = [loader.read_shard(ref, r, 2) for r in range(2)]
    ids = np.concatenate([s.row_ids for s in shards])
    assert len(ids) == len(set(ids.tolist())) == 203
    assert shards[0].rows_per_rank == [len(shards[0]), len(shards[1])]
    for s in shards:  # flat tokens + offsets reproduce each row
        for i in range(len(s)):
            assert len(s.ids(i)) == s.lengths[i]
    all_tokens = sorted(tuple(s.ids(i).tolist()) for s in shards for i in range(len(s)))
    assert all_tokens == sorted(tuple(r[1]) for r in rows)


def test_same_number_of_batches_on_every_rank(staged):
    ref, _ = staged
    shards = [loader.read_shard(ref, r, 2) for r in range(2)]
    plans = [loader.plan_train_batches(s, 8, seed=1, epoch=0, group_by_length=True) for s in shards]
    assert len(plans[0]) == len(plans[1]) == loader.batches_per_epoch(shards[0], 8)
    # A rank with fewer rows wraps around, and every row of the rank is used.
    for s, plan in zip(shards, plans):
        assert set(np.concatenate(plan).tolist()) == set(range(len(s)))


def test_plans_are_seeded(staged):
    s = loader.read_shard(staged[0], 0, 2)
    a = loader.plan_train_batches(s, 8, seed=1, epoch=0, group_by_length=True)
    b = loader.plan_train_batches(s, 8, seed=1, epoch=0, group_by_length=True)
    c = loader.plan_train_batches(s, 8, seed=1, epoch=1, group_by_length=True)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))


def test_collate_pads_to_the_longest_row_in_the_batch(staged):
    s = loader.read_shard(staged[0], 0, 1)
    index = np.array([0, 1, 2])
    batch = loader.collate(s, index, pad_id=0)
    width = int(s.lengths[index].max())
    assert batch["input_ids"].shape == (3, width)
    assert (batch["attention_mask"].sum(axis=1) == s.lengths[index]).all()
    for row, i in enumerate(index):
        n = s.lengths[i]
        assert (batch["input_ids"][row, :n] == s.ids(i)).all() and (batch["input_ids"][row, n:] == 0).all()


def test_grouping_by_length_cuts_padding(staged):
    s = loader.read_shard(staged[0], 0, 1)

    def padding_share(plan):
        real = sum(int(s.lengths[b].sum()) for b in plan)
        padded = sum(int(s.lengths[b].max()) * len(b) for b in plan)
        return 1 - real / padded

    grouped = padding_share(loader.plan_train_batches(s, 8, 1, 0, group_by_length=True))
    random = padding_share(loader.plan_train_batches(s, 8, 1, 0, group_by_length=False))
    assert grouped < random / 2


def test_fewer_row_groups_than_processes_is_refused(spark, tmp_path):
    """One training row can go to one process only: the check names the numbers and the fix."""
    from spark_tuning.errors import InputError

    df = spark.createDataFrame([(1, [5, 6, 7], 3)], "label int, input_ids array<int>, length int")
    ref = loader.stage(df, str(tmp_path / "train"), num_files=4)
    loader.check_training_shards(ref, 1)
    with pytest.raises(InputError) as err:
        loader.check_training_shards(ref, 2)
    message = str(err.value)
    assert "1 training rows were staged as 1 row group(s)" in message
    assert "distributed.num_processes = 2" in message and "at most 1" in message
    # What the check prevents: rank 1 would have no batches while rank 0 steps.
    shards = [loader.read_shard(ref, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [1, 0]
    assert loader.plan_train_batches(shards[1], 8, seed=1, epoch=0, group_by_length=False) == []


def test_job_with_too_few_training_rows_for_its_processes_stops_before_training(spark, tmp_path, tiny_bert_dir):
    from conftest import tiny_job_config
    from spark_tuning import finetune
    from spark_tuning.errors import InputError

    data = tmp_path / "two.jsonl"
    data.write_text('{"text": "a great film", "label": "positive"}\n{"text": "an awful film", "label": "negative"}\n')
    cfg = tiny_job_config(tmp_path, str(data), tiny_bert_dir, **{"data.validation_fraction": 0.5})
    with pytest.raises(InputError) as err:
        finetune.run(cfg, spark=spark)
    assert "fewer than the 2 training processes" in str(err.value)
    out = tmp_path / "out"
    assert not (out / "model").exists() and not (out / "mlflow.db").exists()  # no run was started
    assert not (out / ".staging").exists() or os.listdir(out / ".staging") == []
