"""The Task interface: everything that differs between classification, causal_lm and sft.

The job (finetune.py), the rank's loop (train/loop.py), packaging and serving ask the task; none of them
branches on the task's name. A task object is stateless: its methods take the config and what earlier
steps produced. Defaults here are those of classification-like tasks; a task overrides what differs.

  on the driver, before Spark   sequence_length, config_problems, check_model
  in Spark                      stage -> Staged (staged Parquet, figures, extras for the ranks);
                                profile_rows -> Profiled (the same stage up to whole token lengths, unstaged)
  on every rank                 load_model (the head), collate (a batch), loss, eval_before_training,
                                evaluate, prompt_ids
  on the driver, after          metrics, write_outputs (and logged_files), summary_rows
  packaging and serving         generates_text, serving_config, output_columns (the signature), input_examples
  verify                        answer_columns, compare_served (served answers against the run's)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# The answer of a model that serves labels: (column, type) as the MLflow signature declares it.
LABEL_OUTPUTS = (("label", "string"), ("label_id", "long"), ("probability", "double"),
                 ("probabilities", "double[]"))


@dataclass
class Staged:
    """What a task's data stage hands on: the staged splits, figures for the logs, and extras that go to
    every rank (payload "task_extras") and to the served model's config."""

    train_ref: Any  # loader DataRef (or PetastormRef)
    eval_ref: Any
    figures: dict
    extras: dict = field(default_factory=dict)
    id2label: dict = field(default_factory=dict)
    frames: list = field(default_factory=list)  # cached DataFrames, unpersisted at the end
    profile: dict = field(default_factory=dict)  # the start-of-job summary (profile.summarize)

    def release(self) -> None:
        for df in self.frames:
            df.unpersist()


@dataclass
class Profiled:
    """What `spark-tuning profile` reads of a task's data stage: each split's rows with `length`, the row's
    whole token count before anything is cut (DataFrames, nothing staged), the stage's figures (rows per
    split, rows dropped and why), the labels' distribution, and the length the job cuts rows to (None: it
    cuts none: causal_lm packs texts into blocks, token_classification slides windows)."""

    train: Any
    eval: Any
    figures: dict
    labels: dict = field(default_factory=dict)  # split -> {label: rows}, or a target's statistics
    cut_at: Optional[int] = None
    frames: list = field(default_factory=list)  # cached DataFrames, unpersisted at the end

    def release(self) -> None:
        for df in self.frames:
            df.unpersist()


class Task:
    name = ""
    auto_model = "AutoModelForSequenceClassification"  # the transformers class that builds its head
    peft_task_type = "SEQ_CLS"
    generates_text = False  # the served model answers generated text (and maybe labels) instead of labels
    eval_before_training = False  # evaluate the untrained model too (before/after figures)
    verifiable = True  # deploy.verify can compare its served answers with offline predictions
    reads_pairs = False  # data.text_pair_column: a second text per row, the tokenizer's pair input
    chooses_truncation = False  # data.truncation: head, tail or head_tail of a long text (text/truncation.py)
    truncates = True  # rows longer than data.max_length are cut (causal_lm packs blocks, token_classification slides windows)
    # The validation metrics each evaluation logs: what train.early_stopping.metric (and keep_best) may name.
    eval_metrics: tuple[str, ...] = ("eval_loss",)
    length_key = "max_length"  # the data setting that bounds a row (sequence_length)
    answer_columns = ("label_id", "probabilities")  # what verify needs in a served answer to compare
    logged_files: tuple[str, ...] = ()  # files of write_outputs that also go into the MLflow run

    def sequence_length(self, cfg) -> int:
        """The longest row a batch can hold (data.max_length; causal_lm: data.block_size)."""
        return cfg.data.max_length

    def config_problems(self, cfg) -> list[str]:
        return []

    def petastorm_problems(self, cfg) -> list[str]:
        """The petastorm loader stages class ids only: every other task refuses it."""
        if cfg.loader.kind != "petastorm":
            return []
        return [f"loader.kind = 'petastorm' supports task: classification only (task = {self.name!r}): "
                "use loader.kind: parquet"]

    def check_model(self, cfg, src, tokenizer, model_config) -> dict:
        """Refuse settings the model cannot take, before Spark works; returns what was resolved."""
        return {}

    def stage(self, spark, cfg, src, info: dict, staging: str) -> Staged:
        raise NotImplementedError

    def profile_rows(self, spark, cfg, src, info: dict) -> Profiled:
        raise NotImplementedError

    def load_model(self, cfg, src, tokenizer, id2label: dict, device: str, dtype):
        raise NotImplementedError

    def collate(self, shard, index, pad_id: int) -> dict:
        """One training batch's host arrays from the rank's shard (rows `index`, padded to the longest)."""
        from spark_tuning.loader.batches import collate

        return collate(shard, index, pad_id)

    def loss(self, model, batch: dict, cfg):
        """The training loss of one batch on the device; by default the head's own loss from `labels`
        (cross-entropy over classes, or over next tokens for the LM tasks)."""
        return model(**batch).loss

    def evaluate(self, model, shard, cfg, extras: dict, tokenizer, ctx, precision: str, step: int, tracker,
                 id2label: dict) -> tuple[dict, dict]:
        """On every rank: (the record for this evaluation, per-row predictions), the same on every rank."""
        raise NotImplementedError

    def prompt_ids(self, tokenizer, prompt: str, cfg, extras: dict) -> list[int]:
        """A sample prompt's token ids as training shaped them (generating tasks only)."""
        raise NotImplementedError

    def metrics(self, result: dict, staged: Staged) -> dict:
        raise NotImplementedError

    def write_outputs(self, folder: str, cfg, metrics: dict, result: dict, staged: Staged) -> None:
        """Task-specific files beside the model (metrics.json and config.yaml are the job's)."""

    def summary_rows(self, metrics: dict) -> list[tuple[str, str]]:
        """The task's lines of the table the job prints at the end."""
        return []

    def serving_config(self, cfg, extras: dict, folder: str) -> dict:
        """What the served model needs beyond the common keys (packaging.model_config); `folder`: the run's
        output folder, with what write_outputs wrote."""
        return {}

    def output_columns(self, serving: dict) -> list[tuple[str, str]]:
        """The served model's answer, (column, type) for the signature; `serving`: its model_config."""
        return list(LABEL_OUTPUTS)

    def input_examples(self, cfg, folder: str) -> list[str]:
        return []

    def compare_served(self, served, held, atol: float):
        """The endpoint's answers (`served`, a DataFrame in row order) against the run's held-out rows
        (`deploy.verify.HeldOut`): an `evaluate.agreement.Agreement`. Default: labels and probabilities."""
        from spark_tuning.evaluate.agreement import compare_labels

        return compare_labels(served, held.rows, held.names, held.offline_metrics, atol)

    def metrics_file_extras(self, result: dict) -> dict:
        """What metrics.json holds beside the metrics (per-epoch records; LM: generated samples)."""
        return {"epochs": result["epochs"]}
