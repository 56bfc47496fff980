"""Package a finished run's model as an MLflow pyfunc model and register it.

The logged model is `serving_model.py` (logged as code, with text/token_spans.py and text/truncation.py beside it) plus the run's Hugging Face folder (for LoRA runs
the merged model; the adapter is logged beside it as a plain artifact) as its one artifact, with a
signature, an input example and explicit pip requirements. Classification models answer label and
probabilities; causal_lm / sft models answer generated text (and, for sft on classification data, the label
as the run's evaluation scored it). It loads with
`mlflow.pyfunc.load_model` anywhere torch and transformers are installed; spark_tuning is not needed.
Registration puts it in the MLflow Model Registry (the local SQLite store here; the workspace or Unity
Catalog registry on Databricks) and points an alias (e.g. `candidate`) at the new version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional, TYPE_CHECKING

from spark_tuning.errors import InputError

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import Config

log = logging.getLogger("spark_tuning.packaging")

# What the served model needs from a run's output folder (weights: every *.safetensors file, so sharded
# models come whole); metrics, plots, predictions and the LoRA adapter stay out.
MODEL_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.txt", "vocab.json",
               "merges.txt", "tokenizer.model", "label_map.json", "generation_config.json")
RECORD = "mlflow_model.json"  # written into the output folder: where the logged model went
INPUT_COLUMN = "text"
PAIR_COLUMN = "text_pair"  # the second text, for models trained on text pairs (data.text_pair_column)


@dataclass(frozen=True)
class ModelRecord:
    tracking_uri: str
    run_id: str
    model_uri: str  # models:/m-<id>: this exact logged model
    registry_uri: Optional[str] = None
    registered_model_name: Optional[str] = None
    version: Optional[str] = None
    alias: Optional[str] = None

    @property
    def serving_uri(self) -> str:
        """What to serve: the alias if there is one, else the version, else the logged model itself."""
        if self.registered_model_name and self.alias:
            return f"models:/{self.registered_model_name}@{self.alias}"
        if self.registered_model_name and self.version:
            return f"models:/{self.registered_model_name}/{self.version}"
        return self.model_uri


def signature(outputs: list[tuple[str, str]], pairs: bool = False):
    """Input: the text column, typed Any and optional on purpose: MLflow's scoring server converts values to
    a `string` column's type before the model sees them ({"inputs": [5]} became the text "5", null became
    "None") and answers a missing column with an error that repeats the request. The model checks every
    row itself (serving_model.texts_from) and answers a short 400. Outputs: the task's (column, type)
    pairs (`Task.output_columns`); "double[]" is a list of doubles, "entities" a list of {label, start, end,
    text, score} objects."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Object, Property, Schema

    def mlflow_type(kind: str):
        if kind == "entities":
            return Array(Object([Property("label", "string"), Property("start", "long"), Property("end", "long"),
                                 Property("text", "string"), Property("score", "double")]))
        return Array(kind[:-2]) if kind.endswith("[]") else kind

    inputs = Schema([ColSpec(AnyType(), c, required=False) for c in (INPUT_COLUMN, PAIR_COLUMN)[:2 if pairs else 1]])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(mlflow_type(kind), name) for name, kind in outputs]))


def pip_requirements() -> list[str]:
    """Exact versions of what the served model imports. Explicit, because MLflow's inference of them pulls
    in unrelated packages (torchvision) and local version tags (+cpu) that PyPI cannot install."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas"):
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def model_config(cfg: Config, precision: str, folder: str, extras: Optional[dict] = None) -> dict:
    """The served model's settings: the common ones, and what the task adds (`task.serving_config`, from
    `extras`, what its data stage found: chat template use, label names and their first tokens)."""
    from spark_tuning.tasks import get_task

    task = get_task(cfg.task)
    return {
        "task": cfg.task,
        "max_length": cfg.sequence_length,
        "batch_size": cfg.train.eval_batch_size,
        "precision": precision,
        "device": "auto",  # a GPU where the server has one (serving_model.serving_placement)
        "max_chars": cfg.deploy.max_text_chars,
        "text_column": INPUT_COLUMN,
        **({"text_pair_column": PAIR_COLUMN} if cfg.data.text_pair_column else {}),
        # data.truncation other than head: the served model cuts long texts as training did (text/truncation.py)
        **({"truncation": cfg.data.truncation, "head_tokens": cfg.data.head_tokens}
           if cfg.data.truncation != "head" else {}),
        **task.serving_config(cfg, extras or {}, folder),
    }


def _model_folder(output_dir: str, into: str) -> str:
    """A folder with only the files the served model needs (hard links where possible: no 90 MB copy)."""
    os.makedirs(into)
    weights = sorted(n for n in os.listdir(output_dir) if n.endswith(".safetensors"))
    for name in (*MODEL_FILES, *weights):
        src = os.path.join(output_dir, name)
        if os.path.isfile(src):
            try:
                os.link(src, os.path.join(into, name))
            except OSError:
                shutil.copy2(src, os.path.join(into, name))
    if not os.path.isfile(os.path.join(into, "config.json")) or not weights:
        raise InputError(f"{output_dir} has no config.json or no *.safetensors weights: it is not a finished "
                         "spark-tuning model folder")
    return into


def _input_example(output_dir: str, cfg: Config):
    import pandas as pd

    from spark_tuning.tasks import get_task

    rows = get_task(cfg.task).input_examples(cfg, output_dir)  # texts, or {text, text_pair} records
    if rows and isinstance(rows[0], dict):
        return pd.DataFrame(rows)
    return pd.DataFrame({INPUT_COLUMN: rows or ["a film worth seeing", "a dull, tedious film"]})


def log_model(cfg: Config, run_id: str, tracking_uri: str, output_dir: str, precision: str,
              extras: Optional[dict] = None) -> ModelRecord:
    """Log `output_dir` (a run's model folder) into run `run_id` as a pyfunc model; register and alias it.
    `extras`: see model_config."""
    import mlflow
    import mlflow.pyfunc

    from spark_tuning.deploy import serving_model
    from spark_tuning.tasks import get_task
    from spark_tuning.text import token_spans, truncation

    d = cfg.deploy
    name = (d.registered_model_name or cfg.resolved_run_name) if d.register else None
    mlflow.set_tracking_uri(tracking_uri)
    if d.registry_uri:
        mlflow.set_registry_uri(d.registry_uri)
    config = model_config(cfg, precision, output_dir, extras)
    with tempfile.TemporaryDirectory(prefix="spark-tuning-package-") as tmp:
        folder = _model_folder(output_dir, os.path.join(tmp, "hf"))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=serving_model.__file__,  # logged as code: no pickled classes
                # What it imports beside itself: token classification's windows, data.truncation's cut.
                code_paths=[token_spans.__file__, truncation.__file__],
                artifacts={"model": folder},
                model_config=config,
                signature=signature(get_task(cfg.task).output_columns(config), pairs="text_pair_column" in config),
                input_example=_input_example(output_dir, cfg),
                pip_requirements=pip_requirements(),
                registered_model_name=name,
            )
    # Leaving start_run() marks the run FINISHED; the job still owns it and ends it itself.
    mlflow.MlflowClient(tracking_uri).update_run(run_id, status="RUNNING")
    version = str(info.registered_model_version) if name and info.registered_model_version else None
    record = ModelRecord(tracking_uri, run_id, info.model_uri, d.registry_uri, name, version, None)
    if name and version and d.alias:
        set_alias(name, version, d.alias, tracking_uri, d.registry_uri)
        record = ModelRecord(**{**asdict(record), "alias": d.alias})
    log.info("logged MLflow model %s%s", info.model_uri,
             f"; registered as {name} version {version}" + (f" (@{d.alias})" if record.alias else "") if name else "")
    return record


def set_alias(name: str, version: str, alias: str, tracking_uri: Optional[str] = None,
              registry_uri: Optional[str] = None) -> None:
    """Point `alias` at `version` of registered model `name` (moving it if another version had it)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise InputError(f"registered model {name!r} has no version {version!r} in {registry_uri or tracking_uri} "
                         f"({e.message.splitlines()[0]}): check --name and --version") from None
    client.set_registered_model_alias(name, alias, str(version))


def write_record(output_dir: str, record: ModelRecord) -> str:
    path = os.path.join(output_dir, RECORD)
    with open(path, "w") as f:
        json.dump({**asdict(record), "serving_uri": record.serving_uri}, f, indent=2)
    return path


def read_record(output_dir: str) -> Optional[ModelRecord]:
    path = os.path.join(output_dir, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        raw = json.load(f)
    raw.pop("serving_uri", None)
    return ModelRecord(**raw)
