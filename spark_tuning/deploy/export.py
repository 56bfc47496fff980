"""`spark-tuning export-serving-config`: files that deploy the logged MLflow model elsewhere.

Written into one folder:
  databricks/serving_endpoint.json   body for POST /api/2.0/serving-endpoints (Databricks Model Serving),
                                     serving a registered model version (workspace or Unity Catalog)
  azureml/endpoint.yml               an Azure ML managed online endpoint
  azureml/deployment.yml             its deployment: the MLflow model, no scoring script or environment
                                     needed (Azure ML's no-code deployment for MLflow models)
  azureml/model/                     the MLflow model itself, uploaded by `az ml online-deployment create`
  README.md                          the commands, and a request for each target
Nothing here calls a cloud: these are files to review and apply.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import yaml

from spark_tuning.errors import InputError


@dataclass(frozen=True)
class Target:
    model_uri: str  # what to deploy: models:/name/version, models:/name@alias, or a local MLflow model folder
    endpoint_name: str
    registered_model_name: Optional[str]
    version: Optional[str]
    workload_size: str = "Small"
    scale_to_zero: bool = True
    azure_instance_type: str = "Standard_DS3_v2"
    azure_instance_count: int = 1


def endpoint_name(name: str) -> str:
    """Both clouds want 3-32 characters of letters, digits and dashes, starting with a letter."""
    clean = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-").lower()
    if not clean[:1].isalpha():
        clean = "m-" + clean
    return clean.ljust(3, "0")[:32].rstrip("-")


def databricks_config(t: Target) -> dict:
    if not (t.registered_model_name and t.version):
        raise InputError("a Databricks serving endpoint serves a registered model version: pass a models:/NAME/VERSION "
                         "or models:/NAME@ALIAS URI (register with deploy.register: true)")
    served = endpoint_name(f"{t.registered_model_name.split('.')[-1]}-{t.version}")
    return {
        "name": t.endpoint_name,
        "config": {
            "served_entities": [{
                "name": served,
                "entity_name": t.registered_model_name,  # catalog.schema.model for Unity Catalog
                "entity_version": str(t.version),
                "workload_size": t.workload_size,
                "workload_type": "CPU",
                "scale_to_zero_enabled": t.scale_to_zero,
            }],
            "traffic_config": {"routes": [{"served_model_name": served, "traffic_percentage": 100}]},
        },
    }


def azure_files(t: Target) -> tuple[dict, dict]:
    endpoint = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/managedOnlineEndpoint.schema.json",
        "name": t.endpoint_name,
        "auth_mode": "key",
    }
    deployment = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/managedOnlineDeployment.schema.json",
        "name": "blue",
        "endpoint_name": t.endpoint_name,
        "model": {"name": endpoint_name(t.registered_model_name or t.endpoint_name), "path": "./model",
                  "type": "mlflow_model"},
        "instance_type": t.azure_instance_type,
        "instance_count": t.azure_instance_count,
    }
    return endpoint, deployment


def resolve(model_uri: str, tracking_uri: Optional[str], name: Optional[str]) -> Target:
    """Turn a models:/ URI (version or alias) into a registered name and version."""
    registered, version = None, None
    if model_uri.startswith("models:/") and not model_uri.startswith("models:/m-"):
        rest = model_uri[len("models:/"):]
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        if "@" in rest:
            registered, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(registered, alias).version
        else:
            registered, _, version = rest.partition("/")
            client.get_model_version(registered, version)
    return Target(model_uri, name or endpoint_name(registered or "spark-tuning-model"), registered,
                  str(version) if version else None)


def write(target: Target, out_dir: str, tracking_uri: Optional[str] = None, copy_model: bool = True) -> list[str]:
    """Write the files; returns their paths. Refuses to write into a folder that already holds files."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise InputError(f"--out {out_dir} already holds files: choose an empty or new folder")
    written = []
    os.makedirs(os.path.join(out_dir, "azureml"), exist_ok=True)
    if target.registered_model_name and target.version:
        os.makedirs(os.path.join(out_dir, "databricks"), exist_ok=True)
        path = os.path.join(out_dir, "databricks", "serving_endpoint.json")
        with open(path, "w") as f:
            json.dump(databricks_config(target), f, indent=2)
        written.append(path)
    endpoint, deployment = azure_files(target)
    for name, body in (("endpoint.yml", endpoint), ("deployment.yml", deployment)):
        path = os.path.join(out_dir, "azureml", name)
        with open(path, "w") as f:
            yaml.safe_dump(body, f, sort_keys=False)
        written.append(path)
    if copy_model:
        model_dir = os.path.join(out_dir, "azureml", "model")
        if os.path.isdir(target.model_uri):
            shutil.copytree(target.model_uri, model_dir)
        else:
            import mlflow
            from mlflow.artifacts import download_artifacts

            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)
            download_artifacts(artifact_uri=target.model_uri, dst_path=model_dir)
        written.append(model_dir)
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as f:
        f.write(_readme(target))
    written.append(path)
    return written


def _readme(t: Target) -> str:
    request = json.dumps({"dataframe_records": [{"text": "A gripping, beautifully acted film."}]})
    azure_request = json.dumps({"input_data": {"columns": ["text"], "data": [["A gripping, beautifully acted film."]]}})
    lines = [f"# Deploying {t.model_uri}", ""]
    if t.registered_model_name and t.version:
        lines += [
            "## Databricks Model Serving", "",
            f"Serves registered model `{t.registered_model_name}` version {t.version} (a Unity Catalog name is "
            "catalog.schema.model).", "",
            "```", "databricks serving-endpoints create --json @databricks/serving_endpoint.json",
            "curl -X POST -H \"Authorization: Bearer $DATABRICKS_TOKEN\" -H 'Content-Type: application/json' \\",
            f"  \"$DATABRICKS_HOST/serving-endpoints/{t.endpoint_name}/invocations\" -d '{request}'", "```", "",
        ]
    lines += [
        "## Azure ML managed online endpoint", "",
        "The MLflow model in `azureml/model` deploys without a scoring script or environment.", "",
        "```", "cd azureml",
        "az ml online-endpoint create -f endpoint.yml",
        "az ml online-deployment create -f deployment.yml --all-traffic",
        f"az ml online-endpoint invoke --name {t.endpoint_name} --request-file request.json",
        "```", "", f"with request.json: `{azure_request}`", "",
        "Answers: one record per text with `label`, `label_id`, `probability` and `probabilities`.", "",
    ]
    return "\n".join(lines)
