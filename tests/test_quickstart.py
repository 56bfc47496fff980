"""The README's first command, as a user runs it: ./spark-submit.sh on the embedded defaults; in an
environment that holds secrets (a hub token the config refers to, cloud keys), none of which may reach
the job's output, its logs, MLflow or the output folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


from test_secrets import HUB_TOKEN, OTHER_KEY


@pytest.mark.slow
def test_quickstart_through_spark_submit(tmp_path):
    out = tmp_path / "outputs" / "quickstart"
    env = {**os.environ, "SPARK_TUNING_PYTHON": sys.executable,
           "HF_TOKEN": HUB_TOKEN, "DATABRICKS_TOKEN": OTHER_KEY, "AZURE_OPENAI_API_KEY": OTHER_KEY}
    proc = subprocess.run([os.path.join(ROOT, "spark-submit.sh"), "--set", f"output_dir={out}",
                           "--set", "model.hub_token=env:HF_TOKEN"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for secret in (HUB_TOKEN, OTHER_KEY):
        assert secret not in proc.stdout and secret not in proc.stderr
        for folder, _, files in os.walk(tmp_path / "outputs"):  # MLflow's database and artifacts, the model
            for name in files:
                data = open(os.path.join(folder, name), "rb").read()
                assert secret.encode() not in data, os.path.join(folder, name)
    assert (out / "config.yaml").exists() and (tmp_path / "outputs" / "mlflow.db").exists()
    assert "+ " in proc.stderr and "jobs/finetune.py --config" in proc.stderr  # the command it ran
    table = proc.stdout
    for row in ("| accuracy", "| f1 (binary)", "| output folder", "| MLflow run id", "mlflow ui --backend-store-uri"):
        assert row in table, table
    accuracy = float(table.split("| accuracy")[1].split("|")[1])
    assert accuracy >= 0.75  # the pretrained encoder separates the short reviews well after 4 epochs

    from mlflow import MlflowClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(out))
    assert model.config.id2label == {0: "negative", 1: "positive"}
    run_id = table.split("| MLflow run id")[1].split("|")[1].strip()
    run = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["final_accuracy"] == pytest.approx(accuracy, abs=1e-4)
