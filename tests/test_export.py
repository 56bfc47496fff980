"""export-serving-config: Databricks Model Serving and Azure ML endpoint files for the registered model."""

from __future__ import annotations

import json
import os

import yaml


def test_export_writes_both_targets(packaged_run, tmp_path):
    from spark_tuning.cli import main

    cfg, summary = packaged_run
    out = tmp_path / "serving"
    assert main(["export-serving-config", "--model-uri", "models:/tiny-reviews@candidate",
                 "--tracking-uri", summary.tracking_uri, "--out", str(out)]) == 0
    db = json.loads((out / "databricks" / "serving_endpoint.json").read_text())
    [entity] = db["config"]["served_entities"]
    assert entity["entity_name"] == "tiny-reviews" and entity["entity_version"] == "1"
    assert db["config"]["traffic_config"]["routes"][0]["served_model_name"] == entity["name"]
    assert db["name"] == "tiny-reviews"
    endpoint = yaml.safe_load((out / "azureml" / "endpoint.yml").read_text())
    deployment = yaml.safe_load((out / "azureml" / "deployment.yml").read_text())
    assert deployment["endpoint_name"] == endpoint["name"] == "tiny-reviews"
    assert deployment["model"]["type"] == "mlflow_model" and deployment["model"]["path"] == "./model"
    assert (out / "azureml" / "model" / "MLmodel").is_file()
    assert "az ml online-deployment create" in (out / "README.md").read_text()
    # The folder now holds files: a second export refuses to write into it.
    assert main(["export-serving-config", "--model-uri", "models:/tiny-reviews@candidate",
                 "--tracking-uri", summary.tracking_uri, "--out", str(out)]) == 2


def test_endpoint_names_follow_the_clouds_rules():
    from spark_tuning.deploy.export import endpoint_name

    assert endpoint_name("main.reviews.Sentiment_Model") == "main-reviews-sentiment-model"
    assert endpoint_name("7b") == "m-7b"
    assert endpoint_name("x" * 50) == "x" * 32
