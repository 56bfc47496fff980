"""Batches of one rank's rows: which rows go together in each training step (seeded, length-grouped, or cut
by a token budget), the validation order, and padding a batch to its own longest row. Pure NumPy on a
`Shard`; no Spark, no torch: either loader backend hands its rows over as a Shard.

Length bucketing: with `group_by_length`, each epoch every rank shuffles its rows (seeded by seed and
epoch), groups them bucket by bucket (random order inside a bucket), cuts the batches, and shuffles the
batches: training stays random (which rows meet, and in which order batches come, change every epoch) while
a batch pads its rows by a few percent at most. Batches hold `batch_size` rows, or, with
`train.max_tokens_per_batch`, as many rows as fit `rows x longest row <= budget`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np

from spark_tuning.loader.staging import IGNORE_INDEX, Shard


def plan_train_batches(shard: Shard, batch_size: int, seed: int, epoch: int, group_by_length: bool,
                       max_tokens: Optional[int] = None, n_batches: Optional[int] = None) -> list[np.ndarray]:
    """Row indices of each training batch of one epoch. Seeded by (seed, epoch): the same on every run
    and with either loader backend, different from one epoch to the next. Every row is used once.

    `max_tokens`: instead of `batch_size` rows, a batch takes rows while rows x its longest row stays
    within the budget (a row longer than the budget alone is a batch of one; config refuses budgets below
    the longest possible row). `n_batches`: stretch the plan to this many batches (DDP needs the same
    count on every rank: the training loop passes the largest count of any rank), by halving the batches
    with the most rows; only a rank with fewer rows than batches repeats rows."""
    if len(shard) == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shard))
    if group_by_length:  # bucket by bucket, in random order inside each bucket
        order = order[np.argsort(shard.bucket_keys()[order], kind="stable")]
    if max_tokens is None:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        batches = _cut_by_tokens(order, shard.lengths, max_tokens)
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches if n_batches is None else _stretch(batches, n_batches)


def _cut_by_tokens(order: np.ndarray, lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Consecutive rows of `order` into batches with rows x longest <= budget (never empty)."""
    batches, start, longest = [], 0, 0
    for i, n in enumerate(lengths[order].tolist()):
        wider = max(longest, n)
        if i > start and (i - start + 1) * wider > budget:
            batches.append(order[start:i])
            start, wider = i, n
        longest = wider
    batches.append(order[start:])
    return batches


def _stretch(batches: list[np.ndarray], n_batches: int) -> list[np.ndarray]:
    if len(batches) > n_batches:
        raise ValueError(f"a plan of {len(batches)} batches cannot shrink to {n_batches}")
    out = list(batches)
    while len(out) < n_batches:
        i = max(range(len(out)), key=lambda k: len(out[k]))  # the first of the largest batches
        if len(out[i]) < 2:  # every batch is a single row: repeat rows, in plan order
            out += out[:n_batches - len(out)]
            continue
        half = (len(out[i]) + 1) // 2
        out[i:i + 1] = [out[i][:half], out[i][half:]]
    return out


def optimizer_steps(micro_per_epoch: list[int], grad_accum_steps: int, max_steps: Optional[int]) -> int:
    """Optimizer steps of a run whose epochs have these many micro-batches (capped by train.max_steps)."""
    total = sum(-(-n // grad_accum_steps) for n in micro_per_epoch)
    return min(total, max_steps) if max_steps else total


def plan_figures(shards: list[Shard], train_cfg, seed: int, group_by_length: bool,
                 max_tokens: Optional[int], epochs: Optional[int] = None) -> dict:
    """What the ranks' batch plans come to, planned exactly as the ranks plan them (one Shard per rank):
    micro-batches per epoch (the most of any rank: DDP runs that many everywhere), optimizer steps, and
    epoch 0's tokens, useful and computed (pads included; stretched plans of shorter ranks not counted), and
    its largest batch (rows x longest row). `epochs`: plan only the first ones (default: train.epochs), when
    epoch 0's figures are all that is wanted; total_steps then counts those."""
    tc, micro, useful, computed, widest = train_cfg, [], 0, 0, 0
    for epoch in range(tc.epochs if epochs is None else epochs):
        plans = [plan_train_batches(s, tc.batch_size, seed, epoch, group_by_length, max_tokens) for s in shards]
        micro.append(max((len(p) for p in plans), default=0))
        if epoch == 0:
            for shard, plan in zip(shards, plans):
                for b in plan:
                    rows = shard.lengths[b]
                    useful += int(rows.sum())
                    computed += len(b) * int(rows.max())
                    widest = max(widest, len(b) * int(rows.max()))
    return {"micro_batches_per_epoch": micro, "steps_per_epoch": -(-micro[0] // tc.grad_accum_steps) if micro else 0,
            "total_steps": optimizer_steps(micro, tc.grad_accum_steps, tc.max_steps),
            "useful_tokens_per_epoch": useful, "computed_tokens_per_epoch": computed, "largest_batch_tokens": widest,
            "padding_share": round(1 - useful / computed, 4) if computed else 0.0}


def plan_eval_batches(shard: Shard, batch_size: int) -> list[np.ndarray]:
    """Validation batches sorted by length: predictions do not depend on order, padding does."""
    order = np.lexsort((shard.row_ids, shard.lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(shard: Shard, index: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Pad one batch to its own longest row (right padding), with an attention mask (and token type ids,
    padded with 0, for text pairs). Rows with per-token labels (LM tasks, token classification) get them,
    padded with -100 (never derived from pad ids: SmolLM2 pads with its EOS)."""
    if shard.token_labels is not None:
        return _collate_lm(shard, index, pad_id)
    lengths = shard.lengths[index]
    width = int(lengths.max())
    input_ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    for row, i in enumerate(index):
        n = lengths[row]
        input_ids[row, :n] = shard.ids(i)
        mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": shard.labels[index]}
    if shard.token_types is not None:  # text pairs for BERT-style models: which text each token is from
        types = np.zeros((len(index), width), dtype=np.int64)
        for row, i in enumerate(index):
            types[row, :lengths[row]] = shard.token_types[shard.offsets[i]:shard.offsets[i + 1]]
        batch["token_type_ids"] = types
    return batch


def _collate_lm(shard: Shard, index: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    lengths = shard.lengths[index]
    width = int(lengths.max())
    input_ids = np.full((len(index), width), pad_id, dtype=np.int64)
    labels = np.full((len(index), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    for row, i in enumerate(index):
        n, start = lengths[row], shard.offsets[i]
        input_ids[row, :n] = shard.values[start:start + n]
        labels[row, :n] = shard.token_labels[start:start + n]
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def iterate(shard: Shard, plan: list[np.ndarray], pad_id: int,
            collate_fn: Callable[[Shard, np.ndarray, int], dict] = collate) -> Iterator[tuple[np.ndarray, dict]]:
    for index in plan:
        yield index, collate_fn(shard, index, pad_id)
