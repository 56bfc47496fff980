"""train.eval_every_steps, train.early_stopping and train.keep_best, through the job's train_fn under torchrun on
2 CPU processes (gloo), as TorchDistributor runs it (the data staged with pyarrow: tests/test_fsdp.py's helpers).

To make "no improvement" certain rather than hoped for, the tests ask for an improvement of eval_loss by more
than min_delta 10, which no evaluation after the first can make: patience 2 must stop the run at the third
evaluation on every rank, and keep_best must hand back the first evaluation's model."""

from __future__ import annotations

import os
import shutil

import pytest

from test_fsdp import CLS, _run, classify_data  # noqa: F401  (a module fixture: the staged rows)

from spark_tuning.config import ConfigError, load_config, lower_is_better, metric_key

STOP = {**CLS, "train.max_steps": 16, "train.eval_every_steps": 2, "train.early_stopping.metric": "eval_loss",
        "train.early_stopping.min_delta": 10, "train.early_stopping.patience": 2, "train.keep_best": True}


def test_metric_names_and_directions():
    assert metric_key("accuracy") == "eval_accuracy" == metric_key("eval_accuracy")
    assert lower_is_better("eval_loss") and lower_is_better("perplexity") and lower_is_better("rmse")
    assert not lower_is_better("accuracy") and not lower_is_better("eval_f1_micro")
    assert lower_is_better("accuracy", "min") and not lower_is_better("loss", "max")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.early_stopping.patience=0", "train.early_stopping.metric=acc", "train.keep_best=true",
                           "checkpoint.enabled=false", "train.eval_every_steps=0", "train.early_stopping.mode=up"])
    msg = str(err.value)
    for fragment in ("patience = 0 must be at least 1", "'acc' is not a validation metric of task classification: "
                     "one of eval_loss, eval_accuracy, eval_f1", "set checkpoint.enabled: true",
                     "eval_every_steps = 0 must be at least 1", "mode = 'up' is not one of auto, min, max"):
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_early_stopping_stops_every_rank_keeps_the_best_and_resumes(classify_data, tiny_bert_dir, strategy):  # noqa: F811
    work, data = classify_data
    sets = {**STOP, "distributed.strategy": strategy}
    run = _run(work, f"stop-{strategy}", tiny_bert_dir, data, sets, checkpoint_every=2)
    evals = run["epochs"]
    # Evaluations at steps 2, 4, 6 (none better than step 2's by 10), then stopped; the model did change.
    assert [e["step"] for e in evals[:3]] == [2, 4, 6] and evals[2]["eval_loss"] != evals[0]["eval_loss"]
    assert run["steps"] == 6 and run["stopped_early"] and run["history"][-1]["step"] <= 6
    assert run["best_step"] == 2 and run["best_value"] == evals[0]["eval_loss"]
    # keep_best: the final evaluation is step 2's model again, to the last digit.
    assert evals[-1]["best_model_from_step"] == 2 and evals[-1]["eval_loss"] == evals[0]["eval_loss"]
    ckpts = os.path.join(work, f"stop-{strategy}", "checkpoints")
    # keep_last 5 here; the best checkpoint and the one at the stop are there.
    assert {"step-00000002", "step-00000006"} <= set(os.listdir(ckpts))

    # Resumed from the best checkpoint (step 2): the best so far and the patience count came with it, so the
    # run stops at step 6 again with the same best and the same final model.
    # (A job resumes inside its own checkpoints folder, where the best one is: the same here.)
    resumed_ckpts = os.path.join(work, f"stop-{strategy}-resumed", "checkpoints")
    shutil.copytree(os.path.join(ckpts, "step-00000002"), os.path.join(resumed_ckpts, "step-00000002"))
    again = _run(work, f"stop-{strategy}-resumed", tiny_bert_dir, data, sets, checkpoint_every=2,
                 resume_from=os.path.join(resumed_ckpts, "step-00000002"))
    assert again["steps"] == 6 and again["stopped_early"] and again["best_step"] == 2
    assert again["epochs"][-1]["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)


def test_keep_best_checkpoint_outlives_keep_last(classify_data, tiny_bert_dir):  # noqa: F811
    work, data = classify_data
    sets = {**STOP, "train.early_stopping.patience": "null", "train.max_steps": 8}
    ckpt_work = _run(work, "keep", tiny_bert_dir, data, sets, checkpoint_every=2, keep_last=1)
    assert ckpt_work["steps"] == 8 and not ckpt_work["stopped_early"] and ckpt_work["best_step"] == 2
    assert sorted(os.listdir(os.path.join(work, "keep", "checkpoints"))) == ["step-00000002", "step-00000008"]
