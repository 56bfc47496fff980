"""`spark-tuning profile`: the job's data stage up to whole token lengths, and the report built from it
(rows and drops, labels, lengths and truncation, padding per batching, steps, memory, time, warnings), in
its own MLflow run; and the arithmetic under it (loader.batches.plan_figures, train/budget.py)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import FILLER, NEGATIVE, POSITIVE

from spark_tuning.loader.batches import plan_figures, plan_train_batches
from spark_tuning.loader.staging import Shard
from spark_tuning.train import budget


class _Train:  # the train settings plan_figures reads
    def __init__(self, **kw):
        self.__dict__.update(dict(epochs=2, batch_size=4, grad_accum_steps=1, max_steps=None), **kw)


def test_plan_figures_count_what_the_ranks_plans_hold():
    rng = np.random.default_rng(0)
    shards = [Shard.of_lengths(rng.integers(5, 300, size=n)) for n in (37, 35)]
    tc = _Train(grad_accum_steps=2)
    random_ = plan_figures(shards, tc, 0, group_by_length=False, max_tokens=None)
    buckets = plan_figures(shards, tc, 0, group_by_length=True, max_tokens=None)
    # The figures are those of the rank's own plans: 10 batches of 4 on the larger rank, 5 steps of 2.
    assert random_["micro_batches_per_epoch"] == [10, 10] and random_["steps_per_epoch"] == 5
    assert random_["total_steps"] == 10
    plan = plan_train_batches(shards[0], 4, 0, 0, False)
    computed = sum(len(b) * shards[0].lengths[b].max() for b in plan)
    plan1 = plan_train_batches(shards[1], 4, 0, 0, False)
    computed += sum(len(b) * shards[1].lengths[b].max() for b in plan1)
    assert random_["computed_tokens_per_epoch"] == computed
    assert random_["useful_tokens_per_epoch"] == sum(int(s.lengths.sum()) for s in shards)
    assert buckets["padding_share"] < 0.1 < random_["padding_share"]
    budgeted = plan_figures(shards, tc, 0, group_by_length=True, max_tokens=600)
    assert budgeted["largest_batch_tokens"] <= 600
    assert plan_figures(shards, _Train(max_steps=3), 0, False, None)["total_steps"] == 3


def _shape(**kw):
    base = dict(parameters=100_000_000, trainable=100_000_000, non_embedding=80_000_000, hidden=768, layers=12,
                vocab=50_000, largest_block=7_000_000, lm_head=True)
    return budget.ModelShape(**{**base, **kw})


def test_memory_estimate_follows_strategy_precision_lora_and_checkpointing():
    full = budget.memory_per_process(_shape(), "fp32", "ddp", 2, False, False, 4096, "cuda")
    # fp32 master weights, fp32 gradients, AdamW's two fp32 moments: 4 + 4 + 8 bytes per parameter.
    assert (full["weights"], full["gradients"], full["optimizer"]) == (0.4, 0.4, 0.8)
    sharded = budget.memory_per_process(_shape(), "fp32", "fsdp", 4, False, False, 4096, "cuda")
    assert sharded["weights"] == full["weights"] / 4 and sharded["optimizer"] == full["optimizer"] / 4
    assert sharded["fsdp_gathered_blocks"] > 0 == full["fsdp_gathered_blocks"]
    lora = budget.memory_per_process(_shape(trainable=1_000_000), "bf16", "ddp", 2, True, False, 4096, "cuda")
    assert lora["weights"] < full["weights"] / 1.9 and lora["optimizer"] == 0.008
    # Checkpointing keeps one input per layer (and one layer whole) instead of every layer's activations;
    # the LM head's logits stay (so with a 50k vocabulary they dominate at 4,096 tokens).
    body = budget.memory_per_process(_shape(lm_head=False), "fp32", "ddp", 2, False, False, 4096, "cuda")
    ckpt = budget.memory_per_process(_shape(lm_head=False), "fp32", "ddp", 2, False, True, 4096, "cuda")
    assert ckpt["activations"] < body["activations"] / 3
    assert full["activations"] - body["activations"] == pytest.approx(12 * 4096 * 50_000 / 1e9, abs=1e-3)
    assert sum(v for k, v in full.items() if k != "total") == pytest.approx(full["total"], abs=0.01)
    # Time: the same FLOPs take a quarter as long on a GPU with four times the peak.
    a100, h100 = (g for g in budget.gpu_estimates(_shape(), 1e18, "auto", 1, 10.0) if g["gpu"] in ("A100 80GB", "H100 SXM"))
    assert a100["hours"] / h100["hours"] == pytest.approx(989 / 312, rel=1e-3)
    assert budget.gpu_estimates(_shape(), 1e18, "bf16", 1, 30.0)[0]["fits"] is False  # 30 GB on a 24 GB A10


def test_length_figures_whole_and_as_staged():
    from spark_tuning.profile import length_figures

    whole = np.array([10, 100, 128, 129, 300, 600])
    f = length_figures(whole, 128, True, 512)
    assert f["truncated_at"][128] == pytest.approx(3 / 6, abs=1e-4) and f["truncated_at"][256] == pytest.approx(2 / 6, abs=1e-4)
    assert f["truncated_share"] == f["truncated_at"][128] and f["max"] == 600
    # As staged (cut at 128): shorter lengths are exact, 128 itself an upper bound, longer ones unknown.
    staged = length_figures(np.minimum(whole, 128), 128, False, 512)
    assert staged["truncated_at"][64] == pytest.approx(5 / 6, abs=1e-4) and staged["truncated_at"][128] == pytest.approx(4 / 6, abs=1e-4)
    assert 256 not in staged["truncated_at"]


def _rows(n: int, seed: int = 1) -> list[dict]:
    """Reviews of 5 to 120 words (some far over max_length 32), three empty texts and two without a label."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        words = rng.choices(FILLER, k=rng.choice([5, 10, 20, 60, 120])) + rng.choices(POSITIVE if i % 3 else NEGATIVE, k=2)
        rows.append({"text": " ".join(words), "label": "positive" if i % 3 else "negative"})
    rows += [{"text": "", "label": "positive"}, {"text": "  ", "label": "negative"}, {"text": None, "label": "negative"},
             {"text": "no label here", "label": None}, {"text": "nor here", "label": None}]
    return rows


def test_profile_command_reports_the_data_the_job_would_train_on(spark, tmp_path, tiny_bert_dir, capsys):
    from transformers import AutoTokenizer

    from spark_tuning import cli
    from spark_tuning.config import load_config
    from spark_tuning.data import dataset

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(300)))
    out_dir, report_dir = tmp_path / "out" / "model", tmp_path / "report"
    sets = [f"data.source={data}", f"model.source={tiny_bert_dir}", f"output_dir={out_dir}", "data.max_length=32",
            "train.batch_size=8", "train.epochs=2", "distributed.num_processes=2", "tracking.experiment=profile-tests"]
    code = cli.main(["profile", *sum((["--set", s] for s in sets), []), "--out", str(report_dir)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.load(open(report_dir / "profile.json"))
    assert {"profile.md", "profile.json", "token_lengths.png"} <= set(os.listdir(report_dir))
    assert open(report_dir / "profile.md").read() in printed

    # Rows and drops: what the job's own data stage gives for this config.
    cfg = load_config(None, sets)
    prepared = dataset.prepare(spark, cfg.data, cfg.seed)
    rows = report["rows"]
    assert (rows["train_rows"], rows["eval_rows"]) == (prepared.counts["train_rows"], prepared.counts["eval_rows"])
    assert rows["rows_dropped"]["source"] == {"rows_read": 305, "null_or_empty_text": 3, "no_label": 2}
    train = prepared.train.toPandas()
    assert report["labels"]["train"] == train["label"].map({0: "negative", 1: "positive"}).value_counts().to_dict()

    # Lengths: the tokenizer's own whole lengths of the training rows, and the share over max_length.
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    whole = np.array([len(x) for x in tok(train["text"].tolist())["input_ids"]])
    lengths = report["lengths"]
    assert lengths["max"] == whole.max() and lengths["p50"] == int(np.percentile(whole, 50))
    assert lengths["truncated_share"] == pytest.approx(float((whole > 32).mean()), abs=1e-4)
    assert lengths["truncated_share"] > 0.2
    assert any("of the training rows are longer than data.max_length = 32" in w for w in report["warnings"])
    assert report["batching"]["chosen"] == "length buckets"
    # Nothing was trained or staged: no output folder, no staging data.
    staging = tmp_path / "out" / ".staging"
    assert not out_dir.exists() and (not staging.exists() or not os.listdir(staging))

    # Its own MLflow run: FINISHED, tagged, with the headline figures and the files.
    client = MlflowClient(report["mlflow"]["tracking_uri"])
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["spark_tuning.kind"] == "profile"
    assert run.info.run_name.endswith("-profile")
    assert run.data.metrics["profile_total_steps"] == report["steps"]["total_steps"]
    assert run.data.metrics["profile_truncated_share_at_32"] == pytest.approx(lengths["truncated_share"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "profile")} == \
        {f"profile/{n}" for n in ("profile.md", "profile.json", "token_lengths.png")}

    # A second report into the same folder is refused before any work.
    assert cli.main(["profile", *sum((["--set", s] for s in sets), []), "--out", str(report_dir)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
