"""Issue 2's bad inputs: each ends before training with one clear message, exit code 2, no output left."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_job_config

JOB = os.path.join(ROOT, "jobs", "finetune.py")


def run_job(tmp_path, *sets: str, config: str | None = None):
    args = [sys.executable, JOB, "--set", f"output_dir={tmp_path / 'out' / 'model'}"]
    if config:
        args += ["--config", config]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_refused(proc, tmp_path, *fragments: str):
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.split("spark-tuning: error:")[-1]
    for f in fragments:
        assert f in err, err
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("sets,fragments", [
    (["train.batchsize=8"], ["unknown key 'train.batchsize'", "did you mean 'train.batch_size'"]),
    (["train.batch_size=0", "train.learning_rate=-1e-5"],
     ["train.batch_size = 0 must be greater than 0", "train.learning_rate = -1e-05 must be greater than 0"]),
    (["distributed.num_processes=64"], ["distributed.num_processes = 64 is more than the", "CPU cores"]),
    (["model.source=./no/such/model"], ["tried the local folder", "no/such/model", "does not exist"]),
    (["distributed.use_gpu=true"], ["distributed.use_gpu = true, but no GPU is visible"]),
])
def test_refused_before_spark(tmp_path, sets, fragments):
    assert_refused(run_job(tmp_path, *sets), tmp_path, *fragments)


def test_output_that_holds_a_model_is_refused(tmp_path):
    out = tmp_path / "out" / "model"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (out / ".spark-tuning.json").write_text(json.dumps({"names": ["config.json"]}))  # a finished run's marker
    proc = run_job(tmp_path)
    assert proc.returncode == 2
    assert "already holds a model" in proc.stderr and "--overwrite" in proc.stderr
    assert sorted(os.listdir(out)) == [".spark-tuning.json", "config.json"]


def test_missing_column_through_the_cli(tmp_path, reviews_jsonl, tiny_bert_dir):
    proc = run_job(tmp_path, f"data.source={reviews_jsonl}", f"model.source={tiny_bert_dir}",
                   "data.text_column=review", "spark.conf={spark.ui.enabled: 'false'}")
    assert_refused(proc, tmp_path, "data.text_column = 'review'", "['label', 'text']")


def _data(tmp_path, rows) -> str:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


@pytest.mark.parametrize("rows,message", [
    ([{"text": "", "label": 0}, {"text": None, "label": 1}, {"text": "  ", "label": 1}], "no rows left"),
    ([{"text": f"t{i}", "label": "pos"} for i in range(20)], "single class"),
    ([{"text": f"t{i}", "label": [1, "pos"][i % 2]} for i in range(20)], "mixed types"),
])
def test_bad_data_refused_before_training(spark, tmp_path, tiny_bert_dir, rows, message):
    from spark_tuning import finetune
    from spark_tuning.errors import InputError

    cfg = tiny_job_config(tmp_path, _data(tmp_path, rows), tiny_bert_dir)
    with pytest.raises(InputError, match=message):
        finetune.run(cfg, spark=spark)
    out_root = tmp_path / "out"
    assert not (out_root / "model").exists()
    assert not (out_root / "mlflow.db").exists()  # refused before a run was even opened
