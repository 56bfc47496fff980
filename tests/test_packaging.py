"""The run's model as an MLflow pyfunc model: signature, example, registry, alias, fresh-process loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest


def test_job_logs_registers_and_verifies_the_model(packaged_run):
    from mlflow import MlflowClient

    cfg, summary = packaged_run
    record = json.load(open(os.path.join(summary.output_dir, "mlflow_model.json")))
    assert record["registered_model_name"] == "tiny-reviews" and record["version"] == "1"
    assert record["serving_uri"] == "models:/tiny-reviews@candidate"
    client = MlflowClient(summary.tracking_uri)
    assert str(client.get_model_version_by_alias("tiny-reviews", "candidate").version) == "1"
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    # deploy.verify: the job served the model, checked it against its own offline predictions, stopped it.
    v = summary.deploy["verify"]
    assert v["ok"] and v["agreement"] == 1.0 and v["rows"] == summary.metrics["num_examples"]
    assert v["metrics"]["accuracy"] == summary.metrics["accuracy"]
    assert run.data.tags["spark_tuning.verified"] == "true"
    assert run.data.metrics["verify_agreement"] == 1.0
    assert not [f for f in os.listdir(os.environ["SPARK_TUNING_STATE_DIR"]) if f.endswith(".json")]


def test_logged_model_has_signature_example_and_tokenizer(packaged_run):
    import mlflow
    from mlflow.models import Model

    cfg, summary = packaged_run
    mlflow.set_tracking_uri(summary.tracking_uri)
    local = mlflow.artifacts.download_artifacts(summary.deploy["model_uri"])
    meta = Model.load(local)
    assert meta.signature.inputs.input_names() == ["text"]
    assert [c.name for c in meta.signature.outputs.inputs] == ["label", "label_id", "probability", "probabilities"]
    assert meta.saved_input_example_info is not None
    example = json.load(open(os.path.join(local, meta.saved_input_example_info["artifact_path"])))
    assert "a film worth seeing" in json.dumps(example)  # synthetic: no row of the data travels with the model
    model_config = meta.flavors["python_function"]["config"]
    assert model_config["max_length"] == cfg.data.max_length and model_config["task"] == "classification"
    inner = [os.path.join(d, f) for d, _, fs in os.walk(local) for f in fs]
    names = {os.path.basename(p) for p in inner}
    assert {"model.safetensors", "tokenizer.json", "label_map.json", "config.json", "requirements.txt"} <= names
    assert not names & {"eval_predictions.parquet", "metrics.json"}  # data and reports stay out of the model
    reqs = open(os.path.join(local, "requirements.txt")).read()
    assert "torch==" in reqs and "+cpu" not in reqs and "transformers==" in reqs


def test_fresh_process_predicts_what_the_run_predicted(packaged_run):
    """mlflow.pyfunc.load_model in a new interpreter, from the registry alias: same labels as the run's
    offline evaluation, probabilities to float noise."""
    cfg, summary = packaged_run
    rows = pd.read_parquet(os.path.join(summary.output_dir, "eval_predictions.parquet"))
    script = (
        "import json,sys,mlflow,pandas as pd\n"
        f"mlflow.set_tracking_uri({summary.tracking_uri!r})\n"
        "m = mlflow.pyfunc.load_model('models:/tiny-reviews@candidate')\n"
        "texts = json.load(sys.stdin)\n"
        "out = m.predict(pd.DataFrame({'text': texts}))\n"
        "print(out.to_json(orient='records'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the logged code, not this checkout's
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(rows["text"].tolist()), text=True,
                          capture_output=True, env=env, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = pd.DataFrame(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (out["label_id"].to_numpy() == rows["prediction"].to_numpy()).all()
    assert list(out["label"]) == [["negative", "positive"][i] for i in rows["prediction"]]
    np.testing.assert_allclose(np.stack(out["probabilities"]), np.stack(rows["probabilities"]), atol=1e-5)
    np.testing.assert_allclose(out["probability"], rows["probability"], atol=1e-5)


def test_promote_moves_an_alias(packaged_run):
    import mlflow
    from mlflow import MlflowClient

    from spark_tuning.cli import main

    cfg, summary = packaged_run
    mlflow.set_tracking_uri(summary.tracking_uri)
    second = mlflow.register_model(summary.deploy["model_uri"], "tiny-reviews").version
    client = MlflowClient(summary.tracking_uri)
    args = ["promote", "--tracking-uri", summary.tracking_uri, "--name", "tiny-reviews", "--alias", "champion"]
    assert main([*args, "--version", "1"]) == 0
    assert str(client.get_model_version_by_alias("tiny-reviews", "champion").version) == "1"
    assert main([*args, "--version", str(second)]) == 0
    assert str(client.get_model_version_by_alias("tiny-reviews", "champion").version) == str(second)
    assert str(client.get_model_version_by_alias("tiny-reviews", "candidate").version) == "1"  # untouched
    assert main([*args, "--version", "99"]) == 2  # no such version: bad input, exit code 2


def test_deploy_config_is_checked():
    from spark_tuning.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="deploy.port") as e:
        load_config(None, ["deploy.port=70000", "deploy.verify=true", "tracking.log_model=false"])
    assert "tracking.log_model" in str(e.value)
    with pytest.raises(ConfigError, match="alais"):
        load_config(None, ["deploy.alais=x"])
