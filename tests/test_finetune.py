"""The whole job through the real TorchDistributor (2 CPU processes, gloo), on a tiny random BERT."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_job_config


@pytest.fixture(scope="module")
def finished(packaged_run):
    # The session's packaged run is this job plus model logging and deploy.verify: sharing it saves a
    # whole training job in the suite. What is checked here is the job itself.
    return packaged_run


def test_loss_falls_and_model_learns(finished):
    _, summary = finished
    losses = [h["train_loss"] for h in summary.result["history"]]
    assert len(losses) >= 4
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
    assert summary.result["world_size"] == 2
    assert summary.metrics["accuracy"] > 0.7  # the synthetic labels are easy


def test_outputs_written(finished):
    cfg, summary = finished
    out = summary.output_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "config.yaml",
                 "label_map.json", "confusion_matrix.png", "training_curves.png", "eval_predictions.parquet"):
        assert os.path.isfile(os.path.join(out, name)), name
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["accuracy"] == pytest.approx(summary.metrics["accuracy"])
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["num_examples"] == 32
    # No partial output or staging data is left beside the output.
    root = os.path.dirname(out)
    assert sorted(os.listdir(root)) == ["mlartifacts", "mlflow.db", "model"] or ".staging" in os.listdir(root)
    staging = os.path.join(root, ".staging")
    assert not os.path.exists(staging) or os.listdir(staging) == []


def test_mlflow_run_recorded(finished):
    from mlflow import MlflowClient

    _, summary = finished
    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "8"
    assert run.data.params["derived.max_tokens_per_step"] == str(256 * 2)  # budget x processes
    history = MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, "train_loss")
    assert len(history) == len(summary.result["history"])
    assert run.data.metrics["final_accuracy"] == pytest.approx(summary.metrics["accuracy"])
    assert run.data.params["train.max_tokens_per_batch"] == "256"
    # The run's own speed: tokens/s, padding share and MFU at every logged step, and over the whole run.
    for name in ("tokens_per_second", "padding_share", "mfu"):
        steps = MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, name)
        assert len(steps) == len(summary.result["history"]), name
    assert all(0 < h["mfu"] < 1 for h in summary.result["history"])
    assert run.data.metrics["matmul_peak_gflops"] > 0
    assert float(run.data.params["mfu.peak_gflops_per_process"]) > 0 and "mfu.formula" in run.data.params
    assert run.data.metrics["final_train_mfu"] == pytest.approx(summary.result["mfu"])
    artifacts = {a.path for a in MlflowClient(summary.tracking_uri).list_artifacts(summary.run_id)}
    assert {"metrics.json", "confusion_matrix.png", "config.yaml", "profile"} <= artifacts
    # One step count: the job plans the ranks' batches from the staged rows as they do (a token budget
    # per batch here), and the figure it prints and logs at the start is the one the trainer ran.
    assert int(run.data.params["derived.total_steps"]) == summary.result["steps"] == run.data.metrics["profile_total_steps"]
    profile = {a.path for a in MlflowClient(summary.tracking_uri).list_artifacts(summary.run_id, "profile")}
    assert profile == {"profile/profile.md", "profile/profile.json", "profile/token_lengths.png"}


def test_saved_model_reloads_and_predicts_the_same(finished):
    """Plain transformers, no spark-tuning code: what a user downstream would do."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, summary = finished
    model = AutoModelForSequenceClassification.from_pretrained(summary.output_dir).eval()
    tok = AutoTokenizer.from_pretrained(summary.output_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    rows = pd.read_parquet(os.path.join(summary.output_dir, "eval_predictions.parquet"))
    with torch.inference_mode():
        enc = tok(rows["text"].tolist(), truncation=True, max_length=64, padding=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits, dim=-1).numpy()
    assert (probs.argmax(axis=1) == rows["prediction"].to_numpy()).all()
    np.testing.assert_allclose(probs, np.stack(rows["probabilities"].to_numpy()), atol=1e-4)


def test_existing_output_is_not_overwritten(spark, finished):
    from spark_tuning import finetune
    from spark_tuning.errors import InputError

    cfg, summary = finished
    before = os.path.getmtime(os.path.join(summary.output_dir, "model.safetensors"))
    with pytest.raises(InputError, match="--overwrite"):
        finetune.run(cfg, spark=spark)
    assert os.path.getmtime(os.path.join(summary.output_dir, "model.safetensors")) == before


def test_failed_run_is_marked_failed_and_leaves_nothing(spark, tmp_path, reviews_jsonl, tiny_bert_dir):
    """A runtime failure inside training marks the run FAILED and cleans up. Here: weights whose shapes
    do not fit the model's config (intact safetensors, so the driver's checks pass; the training processes
    fail to load them)."""
    import shutil

    from mlflow import MlflowClient
    from transformers import BertConfig, BertForSequenceClassification

    from spark_tuning import finetune
    from spark_tuning.errors import JobFailed

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_bert_dir, broken)
    config = BertConfig.from_pretrained(tiny_bert_dir)
    config.intermediate_size = 48  # the folder's config.json still says 64
    BertForSequenceClassification(config).save_pretrained(tmp_path / "other-shapes", safe_serialization=True)
    shutil.copy(tmp_path / "other-shapes" / "model.safetensors", broken / "model.safetensors")
    cfg = tiny_job_config(tmp_path, reviews_jsonl, str(broken))
    with pytest.raises(JobFailed):
        finetune.run(cfg, spark=spark)
    out_root = tmp_path / "out"
    assert not (out_root / "model").exists()
    leftovers = [p for p in os.listdir(out_root) if p.startswith(".model.")]
    assert leftovers == []
    assert not os.listdir(out_root / ".staging")
    client = MlflowClient(f"sqlite:///{out_root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
