"""Staging and per-rank reading: every row read once, same steps on every rank, padding per batch."""

from __future__ import annotations

import os

import numpy as np
import pytest

from spark_tuning.loader import batches, staging


@pytest.fixture(scope="module")
def staged(spark, tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [(int(i % 3), [int(x) for x in rng.integers(5, 100, size=int(n))], int(n))
            for i, n in enumerate(rng.integers(1, 60, size=203))]
    df = spark.createDataFrame(rows, "label int, input_ids array<int>, length int")
    return staging.stage(df, str(tmp_path_factory.mktemp("stage") / "train"), num_files=4), rows


def test_ranks_read_disjoint_shares_of_every_row(staged):
    ref, rows = staged
    assert ref.num_rows == 203
    shards = [staging.read_shard(ref, r, 2) for r in range(2)]
    ids = np.concatenate([s.row_ids for s in shards])
    assert len(ids) == len(set(ids.tolist())) == 203
    assert shards[0].rows_per_rank == [len(shards[0]), len(shards[1])]
    for s in shards:  # flat tokens + offsets reproduce each row
        for i in range(len(s)):
            assert len(s.ids(i)) == s.lengths[i]
    all_tokens = sorted(tuple(s.ids(i).tolist()) for s in shards for i in range(len(s)))
    assert all_tokens == sorted(tuple(r[1]) for r in rows)


def _counts(shards, **kw):
    """What the training loop does: every rank plans, the largest count wins."""
    return max(len(batches.plan_train_batches(s, **kw)) for s in shards)


def test_same_number_of_batches_on_every_rank(staged):
    ref, _ = staged
    shards = [staging.read_shard(ref, r, 2) for r in range(2)]
    kw = dict(batch_size=8, seed=1, epoch=0, group_by_length=True)
    n = _counts(shards, **kw)
    assert n == -(-max(len(s) for s in shards) // 8)
    plans = [batches.plan_train_batches(s, **kw, n_batches=n) for s in shards]
    assert len(plans[0]) == len(plans[1]) == n
    # The rank with fewer rows halves some batches instead of repeating rows: every row exactly once.
    for s, plan in zip(shards, plans):
        used = np.concatenate(plan)
        assert sorted(used.tolist()) == list(range(len(s)))
        assert all(0 < len(b) <= 8 for b in plan)


def test_a_rank_with_fewer_rows_than_batches_repeats_rows(staged):
    s = staging.read_shard(staged[0], 0, 1)
    tiny = staging.Shard(s.row_ids[:3], s.labels[:3], s.lengths[:3], s.offsets[:4], s.values, [3])
    plan = batches.plan_train_batches(tiny, 8, seed=1, epoch=0, group_by_length=True, n_batches=5)
    assert len(plan) == 5 and all(len(b) == 1 for b in plan)
    assert set(np.concatenate(plan).tolist()) == {0, 1, 2}


def test_collate_pads_to_the_longest_row_in_the_batch(staged):
    s = staging.read_shard(staged[0], 0, 1)
    index = np.array([0, 1, 2])
    batch = batches.collate(s, index, pad_id=0)
    width = int(s.lengths[index].max())
    assert batch["input_ids"].shape == (3, width)
    assert (batch["attention_mask"].sum(axis=1) == s.lengths[index]).all()
    for row, i in enumerate(index):
        n = s.lengths[i]
        assert (batch["input_ids"][row, :n] == s.ids(i)).all() and (batch["input_ids"][row, n:] == 0).all()


def test_grouping_by_length_cuts_padding(staged):
    s = staging.read_shard(staged[0], 0, 1)

    def padding_share(plan):
        real = sum(int(s.lengths[b].sum()) for b in plan)
        padded = sum(int(s.lengths[b].max()) * len(b) for b in plan)
        return 1 - real / padded

    grouped = padding_share(batches.plan_train_batches(s, 8, 1, 0, group_by_length=True))
    random = padding_share(batches.plan_train_batches(s, 8, 1, 0, group_by_length=False))
    assert grouped < random / 2


def test_fewer_row_groups_than_processes_is_refused(spark, tmp_path):
    """One training row can go to one process only: the check names the numbers and the fix."""
    from spark_tuning.errors import InputError

    df = spark.createDataFrame([(1, [5, 6, 7], 3)], "label int, input_ids array<int>, length int")
    ref = staging.stage(df, str(tmp_path / "train"), num_files=4)
    staging.check_training_shards(ref, 1)
    with pytest.raises(InputError) as err:
        staging.check_training_shards(ref, 2)
    message = str(err.value)
    assert "1 training rows were staged as 1 row group(s)" in message
    assert "distributed.num_processes = 2" in message and "at most 1" in message
    # What the check prevents: rank 1 would have no batches while rank 0 steps.
    shards = [staging.read_shard(ref, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [1, 0]
    assert batches.plan_train_batches(shards[1], 8, seed=1, epoch=0, group_by_length=False) == []


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


# ----------------------------------------------------------------------------------------------------
# Length buckets (staged by Spark) and bucketed batches


def realistic_lengths(n: int, max_length: int = 512, seed: int = 0) -> np.ndarray:
    """Token counts shaped like IMDB reviews under a WordPiece tokenizer: median ~230, a long tail cut
    at max_length (~10% truncated), a few very short rows."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(230), 0.75, size=n), 3, max_length).astype(np.int64)


@pytest.fixture(scope="module")
def spark_buckets(spark):
    """Lengths 0..600 and realistic ones, with the `bucket` column Spark computes for them."""
    import pandas as pd

    lengths = np.concatenate([np.arange(0, 601), realistic_lengths(3000)])
    df = staging.with_length_buckets(spark.createDataFrame(pd.DataFrame({"length": lengths.astype("int32")})))
    got = df.toPandas()
    return got["length"].to_numpy().astype(np.int64), got["bucket"].to_numpy().astype(np.int64)


def test_spark_buckets_match_numpy_and_hold_similar_lengths(spark_buckets):
    lengths, buckets = spark_buckets
    assert (buckets == staging.length_buckets(lengths)).all()  # the loader's fallback gives the same
    assert (np.diff(buckets[np.argsort(lengths)]) >= 0).all()  # buckets are ordered by length
    for b in np.unique(buckets[lengths >= 10]):
        inside = lengths[buckets == b]
        assert inside.max() <= 1.1 * inside.min() + 1  # lengths within ~10% of each other


def test_staged_rows_carry_the_spark_bucket(staged):
    s = staging.read_shard(staged[0], 0, 1)
    assert s.buckets is not None and (s.buckets == staging.length_buckets(s.lengths)).all()


def _shard(lengths, buckets=None) -> staging.Shard:
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = len(lengths)
    return staging.Shard(np.arange(n), np.zeros(n, np.int64), lengths, offsets, np.zeros(offsets[-1], np.int32),
                        [n], buckets=buckets)


def _padding_share(shard, plan) -> float:
    real = sum(int(shard.lengths[b].sum()) for b in plan)
    return 1 - real / sum(int(shard.lengths[b].max()) * len(b) for b in plan)


def test_bucketed_batches_pad_under_ten_percent_on_realistic_lengths(spark_buckets):
    lengths, buckets = spark_buckets
    keep = slice(601, None)  # the realistic rows
    s = _shard(lengths[keep], buckets[keep])
    for epoch in range(3):
        plan = batches.plan_train_batches(s, 16, seed=5, epoch=epoch, group_by_length=True)
        assert _padding_share(s, plan) < 0.10
        assert sorted(np.concatenate(plan).tolist()) == list(range(len(s)))
    random = batches.plan_train_batches(s, 16, seed=5, epoch=0, group_by_length=False)
    assert _padding_share(s, random) > 0.3


def test_bucketed_batches_stay_random(spark_buckets):
    """Which rows share a batch, and the order of the batches, change from epoch to epoch."""
    lengths, buckets = spark_buckets
    s = _shard(lengths[601:], buckets[601:])
    a, b = (batches.plan_train_batches(s, 16, seed=5, epoch=e, group_by_length=True) for e in (0, 1))
    pairs = [{frozenset(x.tolist()) for x in plan} for plan in (a, b)]
    assert len(pairs[0] & pairs[1]) < len(a) // 10  # few batches hold the same rows in both epochs
    first_lengths = [int(s.lengths[x].max()) for x in a[:20]]
    assert first_lengths != sorted(first_lengths)  # not served shortest first


# ----------------------------------------------------------------------------------------------------
# Token budget per batch (train.max_tokens_per_batch)


def test_token_budget_batches_fit_the_budget_and_use_every_row_once(spark_buckets):
    lengths, buckets = spark_buckets
    s = _shard(lengths[601:], buckets[601:])
    budget = 4096
    for group in (True, False):
        plan = batches.plan_train_batches(s, 16, seed=2, epoch=0, group_by_length=group, max_tokens=budget)
        assert all(len(b) * int(s.lengths[b].max()) <= budget for b in plan)
        assert sorted(np.concatenate(plan).tolist()) == list(range(len(s)))
    # Bucketed: short rows travel in big batches, long ones in small; little padding either way.
    plan = batches.plan_train_batches(s, 16, seed=2, epoch=0, group_by_length=True, max_tokens=budget)
    assert _padding_share(s, plan) < 0.10
    sizes = {int(s.lengths[b].max()): len(b) for b in plan}
    assert sizes[min(sizes)] > sizes[max(sizes)]
    # Batches are nearly full: the budget, not a row count, decides how much each step computes.
    used = [len(b) * int(s.lengths[b].max()) / budget for b in plan]
    assert np.median(used) > 0.9


def test_token_budget_keeps_ranks_in_step_and_never_makes_empty_batches(staged):
    ref, _ = staged
    shards = [staging.read_shard(ref, r, 2) for r in range(2)]
    kw = dict(batch_size=8, seed=3, epoch=1, group_by_length=True, max_tokens=100)
    n = _counts(shards, **kw)
    plans = [batches.plan_train_batches(s, **kw, n_batches=n) for s in shards]
    assert len(plans[0]) == len(plans[1]) == n
    for s, plan in zip(shards, plans):
        assert all(len(b) >= 1 and len(b) * int(s.lengths[b].max()) <= 100 for b in plan)
        assert sorted(np.concatenate(plan).tolist()) == list(range(len(s)))
    # A row longer than the budget (config refuses such budgets; the planner still copes): a batch alone.
    s = shards[0]
    plan = batches.plan_train_batches(s, 8, seed=3, epoch=0, group_by_length=True, max_tokens=int(s.lengths.max()) - 1)
    longest = int(np.argmax(s.lengths))
    assert [b.tolist() for b in plan if longest in b] == [[longest]]
