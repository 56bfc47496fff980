"""The MLflow pyfunc model that spark-tuning logs: text in, label and probabilities out.

This file is logged *as code* with the model (MLflow "models from code"): MLflow copies it into the model
and runs it on load, so it must stay self-contained. It imports only torch, transformers, numpy, pandas
and mlflow, never spark_tuning, so the logged model loads wherever those are installed (a scoring
server, a Spark executor, Databricks Model Serving, Azure ML) without this package.

What the model does is set by its `model_config` (written by spark_tuning.packaging):
  task          "classification" (built). A generation flavour (causal LM / SFT: text in, generated text
                out) adds its own class below and one entry in TASKS; the loader picks by `task`.
  max_length    tokens kept per text: the training run's data.max_length, so inputs are cut as in training
  batch_size    rows per forward pass
  precision     "fp32" or "bf16": the precision the run's own evaluation used
  max_chars     longer texts are refused with a 400 instead of tying up the server
  text_column   the input column that holds the text

Predictions match the run's offline ones: the same tokenizer, truncation, right padding with an attention
mask, only input_ids and attention_mask passed (as the training loader does), batches sorted by length.
"""

from __future__ import annotations

import threading

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE: MLflow's scoring server answers it with HTTP 400 and a JSON body.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def texts_from(model_input, column: str, max_chars: int) -> list[str]:
    """Accept what clients send (a DataFrame with the text column, a Series, a list of strings or of
    records, one string) and return a list of strings, or raise a 400-mapped error that says what is wrong."""
    if isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if column not in model_input.columns:
            raise _bad_input(f"input has no {column!r} field (got {list(map(str, model_input.columns))}): "
                             f"send e.g. {{\"dataframe_records\": [{{\"{column}\": \"a review\"}}]}}")
        values = model_input[column].tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        values = [v.get(column) if isinstance(v, dict) else v for v in model_input]
    elif isinstance(model_input, dict) and column in model_input:
        raw = model_input[column]
        values = list(raw) if isinstance(raw, (list, tuple, np.ndarray)) else [raw]
    else:
        raise _bad_input(f"cannot read texts from a {type(model_input).__name__}: send a list of strings "
                         f"or records with a {column!r} field")
    if not values:
        raise _bad_input("the request holds no rows: send at least one text")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise _bad_input(f"row {i}: {column!r} must be a string, got {type(v).__name__} {str(v)[:40]!r}")
        if len(v) > max_chars:
            raise _bad_input(f"row {i}: text of {len(v)} characters is longer than the limit of {max_chars}: "
                             "shorten it (only the first max_length tokens are used anyway)")
    return values


class TextClassifier:
    """Hugging Face sequence classifier: returns label, label_id, probability (of that label) and
    probabilities (every class, in label-id order)."""

    def __init__(self, folder: str, cfg: dict):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.max_length = int(cfg.get("max_length", 512))
        self.batch_size = int(cfg.get("batch_size", 64))
        self.precision = cfg.get("precision", "fp32")
        self.max_chars = int(cfg.get("max_chars", 100_000))
        self.column = cfg.get("text_column", "text")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True).eval()
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.model.config.pad_token_id or 0)
        # The scoring server runs requests in threads: one forward pass at a time keeps torch's own
        # threads from oversubscribing the cores, and results do not depend on what else is running.
        self.lock = threading.Lock()

    def predict(self, model_input) -> pd.DataFrame:
        texts = texts_from(model_input, self.column, self.max_chars)
        probs = self.probabilities(texts)
        ids = probs.argmax(axis=1)
        return pd.DataFrame({
            "label": [self.id2label[int(i)] for i in ids],
            "label_id": ids.astype(np.int64),
            "probability": probs[np.arange(len(ids)), ids].astype(np.float64),
            "probabilities": [row.astype(np.float64).tolist() for row in probs],
        })

    def probabilities(self, texts: list[str]) -> np.ndarray:
        import torch

        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        lengths = np.array([len(x) for x in ids])
        order = np.lexsort((np.arange(len(ids)), lengths))  # by length, as the training run evaluates
        out = np.zeros((len(ids), len(self.id2label)), dtype=np.float32)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with self.lock, torch.inference_mode(), autocast:
            for start in range(0, len(order), self.batch_size):
                index = order[start:start + self.batch_size]
                width = int(lengths[index].max())
                input_ids = np.full((len(index), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(index), width), dtype=np.int64)
                for row, i in enumerate(index):
                    input_ids[row, :lengths[i]] = ids[i]
                    mask[row, :lengths[i]] = 1
                logits = self.model(input_ids=torch.from_numpy(input_ids),
                                    attention_mask=torch.from_numpy(mask)).logits
                out[index] = torch.softmax(logits.float(), dim=-1).numpy()
        return out


# A generation flavour (causal LM / SFT) adds its class here: same constructor, predict -> DataFrame.
TASKS = {"classification": TextClassifier}


class SparkTuningModel(mlflow.pyfunc.PythonModel):
    """What MLflow loads: picks the implementation for the model's task from its model_config."""

    def load_context(self, context):
        cfg = dict(context.model_config or {})
        task = cfg.get("task", "classification")
        if task not in TASKS:
            raise MlflowException(f"this model's task {task!r} is not one this code serves: {sorted(TASKS)}")
        self.impl = TASKS[task](context.artifacts["model"], cfg)

    def predict(self, context, model_input, params=None):
        return self.impl.predict(model_input)


mlflow.models.set_model(SparkTuningModel())
