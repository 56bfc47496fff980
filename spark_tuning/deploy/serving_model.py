"""The MLflow pyfunc model that spark-tuning logs: text in; label and probabilities out (classification),
a number out (regression), generated text out (causal LM / SFT).

This file is logged *as code* with the model (MLflow "models from code"): MLflow copies it into the model
and runs it on load, so it must stay self-contained. It imports only torch, transformers, numpy, pandas
and mlflow, truncation.py (logged beside it: data.truncation's head / tail / head_tail cut) and token_spans.py
(logged beside it too: the windows and entity decoding token classification
shares with training), never the rest of spark_tuning, so the logged model loads wherever those are
installed (a scoring server, a Spark executor, Databricks Model Serving, Azure ML) without this package.

What the model does is set by its `model_config` (written by spark_tuning.deploy.packaging; a key can be overridden
at load time: mlflow.pyfunc.load_model(uri, model_config={"max_new_tokens": 64})):
  task          "classification" -> TextClassifier; "multilabel_classification" -> TextMultiLabel;
                "regression" -> TextRegressor; "token_classification" -> TextTagger;
                "causal_lm" or "sft" -> TextGenerator
  unit, stride  token classification: what a tag belongs to ("word" or "token") and the windows' overlap
  thresholds    multilabel: {label name: threshold}, 0.5 where absent
  target_mean, target_std   regression: the prediction is the output x target_std + target_mean
  max_length    tokens kept per text (classification, sft: data.max_length; causal_lm: data.block_size), so
                inputs are cut as in training
  truncation, head_tokens   classification / regression / multilabel: which tokens of a longer text are kept
                (head where absent; tail; head_tail with head_tokens from the start), as data.truncation
  batch_size    rows per forward pass (classification)
  precision     "fp32", "bf16" or "fp16": the precision the run's own evaluation used (classification)
  device        "auto" (a GPU where one is visible, else the CPU), "cpu", or "cuda:N"
  max_chars     longer texts are refused with a 400 instead of tying up the server
  text_column   the input column that holds the text
  text_pair_column   classification / regression / multilabel trained on text pairs: the second text's column
  generation only: max_new_tokens, chat_template (sft: prompts rendered with the tokenizer's template),
  prompt_template (sft on classification data: data.sft_prompt), label_names and label_first_tokens

Classification predictions match the run's offline ones: the same tokenizer, truncation, right padding with
an attention mask, only input_ids and attention_mask passed (as the training loader does), batches sorted
by length. The model runs on a GPU where there is one, in the run's precision where that device has it
natively (bf16 on GPUs of compute capability >= 8.0 and CPUs with bf16 units, fp16 on GPUs >= 7.0), else
in fp32: `serving_placement` says which, and verify allows for the difference. Generation is greedy, one prompt at a time (no padding, so an answer does not depend on what
else is in the request), in fp32 like the run's own samples, with prompts rendered as training rendered them.

Input checking: the signature declares the text column as `Any`, so MLflow hands requests to `predict`
unconverted (with a `string` column its scoring server turns {"inputs": [5]} into the text "5" and null into
"None"); `texts_from` below checks every row and answers a 400 that names the problem.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pandas as pd

try:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
except ImportError:  # the model classes also run without MLflow (bench/gpu_check.py on a bare GPU machine)
    mlflow = None
    INVALID_PARAMETER_VALUE = "INVALID_PARAMETER_VALUE"

    class MlflowException(Exception):  # type: ignore[no-redef]
        def __init__(self, message, error_code=None):
            super().__init__(message)
            self.message = message
            self.error_code = error_code

log = logging.getLogger("spark_tuning.serving_model")


def serving_placement(run_precision: str, device: str = "auto") -> tuple[str, str]:
    """(device, precision) to serve in: a GPU where one is visible (device "auto"); the run's half
    precision where that device computes it natively, else fp32 (emulated bf16 is slow, and fp16 on a
    CPU too). The same rules as the training run's own `precision: auto`."""
    import torch

    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if run_precision not in ("bf16", "fp16"):
        return device, "fp32"
    if device.startswith("cuda"):
        major = torch.cuda.get_device_capability(device)[0]
        native = major >= 8 if run_precision == "bf16" else major >= 7
    else:
        native = run_precision == "bf16" and _cpu_native_bf16()
    return device, run_precision if native else "fp32"


def _cpu_native_bf16() -> bool:
    """bf16 units on this CPU (AVX512-BF16 or AMX), as spark_tuning.train.precision.cpu_native_bf16 (this file
    stays self-contained): oneDNN's "bf16 supported" is true wherever it can emulate bf16, which is slow."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is None for p in probes):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return any(bool(p()) for p in probes if p is not None)


def autocast(precision: str, device: str):
    import contextlib

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()


class BadInput(MlflowException):
    """A request the model cannot answer: HTTP 400 with a short JSON error (INVALID_PARAMETER_VALUE).

    MLflow's scoring server rewrites the message of an error raised in predict to start with the whole
    request ("Failed to predict data '<request>'. Error: ..."), which sends a 10 MB text straight back to
    the client. This exception keeps its own message when that happens, and never grows past LIMIT."""

    LIMIT = 1000

    def __init__(self, message: str):
        super().__init__(str(message)[:self.LIMIT], error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value) -> None:
        own, value = getattr(self, "_message", None), str(value)
        self._message = own if own is not None and own in value else value[:self.LIMIT]


def texts_from(model_input, column: str, max_chars: int) -> list[str]:
    """Accept what clients send (a DataFrame with the text column, a Series, a list of strings or of
    records, one string) and return a list of strings, or raise a 400-mapped error that says what is wrong."""
    if isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if column not in model_input.columns:
            # MLflow keeps only the signature's columns: a request without the field, and one without rows,
            # both arrive as an empty frame.
            raise BadInput(f"the request holds no rows with a {column!r} field: send e.g. "
                           f"{{\"inputs\": [\"a review\"]}} or {{\"dataframe_records\": [{{\"{column}\": \"a review\"}}]}}")
        values = model_input[column].tolist()
        if len(values) == 1 and isinstance(values[0], (list, tuple, np.ndarray)):
            # With an untyped column, MLflow reads {"inputs": ["a", "b"]} (a list of strings only) as one row
            # holding the list; a list with anything else in it arrives as rows.
            values = list(values[0])
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        values = [v.get(column) if isinstance(v, dict) else v for v in model_input]
    elif isinstance(model_input, dict) and column in model_input:
        raw = model_input[column]
        values = list(raw) if isinstance(raw, (list, tuple, np.ndarray)) else [raw]
    else:
        raise BadInput(f"cannot read texts from a {type(model_input).__name__}: send a list of strings "
                       f"or records with a {column!r} field")
    if not values:
        raise BadInput("the request holds no rows: send at least one text")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise BadInput(f"row {i}: {column!r} must be a string, got {type(v).__name__} {str(v)[:40]!r}")
        if len(v) > max_chars:
            raise BadInput(f"row {i}: text of {len(v)} characters is longer than the limit of {max_chars}: "
                           "shorten it (only the first max_length tokens are used anyway)")
    return values


def pairs_from(model_input, column: str, pair_column: str, max_chars: int) -> tuple[list[str], list[str]]:
    """Texts and their pairs (a model trained on text pairs): records or a DataFrame with both fields."""
    if isinstance(model_input, pd.DataFrame) and pair_column in model_input.columns:
        pairs = model_input[pair_column].tolist()
    elif isinstance(model_input, (list, tuple)) and all(isinstance(v, dict) for v in model_input):
        pairs = [v.get(pair_column) for v in model_input]
    else:
        raise BadInput(f"this model compares two texts: send records with {column!r} and {pair_column!r}, e.g. "
                       f"{{\"dataframe_records\": [{{\"{column}\": \"a\", \"{pair_column}\": \"b\"}}]}}")
    texts = texts_from(model_input, column, max_chars)
    for i, v in enumerate(pairs):
        if not isinstance(v, str):
            raise BadInput(f"row {i}: {pair_column!r} must be a string, got {type(v).__name__} {str(v)[:40]!r}")
        if len(v) > max_chars:
            raise BadInput(f"row {i}: {pair_column!r} of {len(v)} characters is longer than the limit of {max_chars}")
    return texts, pairs


class TextClassifier:
    """Hugging Face sequence classifier: returns label, label_id, probability (of that label) and
    probabilities (every class, in label-id order)."""

    def __init__(self, folder: str, cfg: dict):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.max_length = int(cfg.get("max_length", 512))
        self.batch_size = int(cfg.get("batch_size", 64))
        self.device, self.precision = serving_placement(cfg.get("precision", "fp32"), cfg.get("device", "auto"))
        self.max_chars = int(cfg.get("max_chars", 100_000))
        self.column = cfg.get("text_column", "text")
        self.pair_column = cfg.get("text_pair_column")  # set for a model trained on text pairs
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # data.truncation: which tokens of a long text the run trained on (head: the tokenizer's own cut)
        self.truncation = cfg.get("truncation") or "head"
        self.head_tokens = cfg.get("head_tokens")
        self.cutter = _truncation().transformers_encoder(self.tokenizer) if self.truncation != "head" else None
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True).to(self.device).eval()
        log.info("serving %s on %s in %s (the run evaluated in %s)", folder, self.device, self.precision,
                 cfg.get("precision", "fp32"))
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.model.config.pad_token_id or 0)
        # The scoring server runs requests in threads: one forward pass at a time keeps torch's own
        # threads from oversubscribing the cores, and results do not depend on what else is running.
        self.lock = threading.Lock()

    def inputs(self, model_input) -> tuple[list[str], list[str] | None]:
        if self.pair_column:
            return pairs_from(model_input, self.column, self.pair_column, self.max_chars)
        return texts_from(model_input, self.column, self.max_chars), None

    def predict(self, model_input) -> pd.DataFrame:
        probs = self.probabilities(*self.inputs(model_input))
        ids = probs.argmax(axis=1)
        return pd.DataFrame({
            "label": [self.id2label[int(i)] for i in ids],
            "label_id": ids.astype(np.int64),
            "probability": probs[np.arange(len(ids)), ids].astype(np.float64),
            "probabilities": [row.astype(np.float64).tolist() for row in probs],
        })

    def probabilities(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        import torch

        return self.outputs(texts, lambda logits: torch.softmax(logits.float(), dim=-1), pairs)

    def outputs(self, texts: list[str], head, pairs: list[str] | None = None) -> np.ndarray:
        """`head(logits)` of every text (or text pair), in input order; batched by length, as the training run
        evaluates (pairs: the tokenizer's pair input, longest_first truncation, with token type ids where the
        model takes them)."""
        import torch

        if self.cutter is not None and pairs is None:
            plain, specials = self.cutter
            ids, types = _truncation().encode(plain, texts, self.max_length, self.truncation, self.head_tokens,
                                              specials), None
        else:
            enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=False)
            ids, types = enc["input_ids"], enc.get("token_type_ids") if pairs is not None else None
        lengths = np.array([len(x) for x in ids])
        order = np.lexsort((np.arange(len(ids)), lengths))
        out = np.zeros((len(ids), self.model.config.num_labels), dtype=np.float32)
        with self.lock, torch.inference_mode(), autocast(self.precision, self.device):
            for start in range(0, len(order), self.batch_size):
                index = order[start:start + self.batch_size]
                width = int(lengths[index].max())
                input_ids = np.full((len(index), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(index), width), dtype=np.int64)
                type_ids = np.zeros((len(index), width), dtype=np.int64)
                for row, i in enumerate(index):
                    input_ids[row, :lengths[i]] = ids[i]
                    mask[row, :lengths[i]] = 1
                    if types is not None:
                        type_ids[row, :lengths[i]] = types[i]
                extra = {"token_type_ids": torch.from_numpy(type_ids).to(self.device)} if types is not None else {}
                logits = self.model(input_ids=torch.from_numpy(input_ids).to(self.device),
                                    attention_mask=torch.from_numpy(mask).to(self.device), **extra).logits
                out[index] = head(logits.float()).cpu().numpy()
        return out


class TextRegressor(TextClassifier):
    """Hugging Face model with one output (task regression): returns `prediction`, in the target's units
    (the output times target_std plus target_mean, as the run standardized its targets)."""

    def __init__(self, folder: str, cfg: dict):
        super().__init__(folder, cfg)
        self.mean, self.std = float(cfg.get("target_mean", 0.0)), float(cfg.get("target_std", 1.0))

    def predict(self, model_input) -> pd.DataFrame:
        texts, pairs = self.inputs(model_input)
        values = self.outputs(texts, lambda logits: logits, pairs)[:, 0]
        return pd.DataFrame({"prediction": values.astype(np.float64) * self.std + self.mean})


class TextMultiLabel(TextClassifier):
    """Hugging Face model with a sigmoid per label (task multilabel_classification): returns `labels` (the
    names whose probability reaches their threshold; possibly none) and `probabilities` (every label's, in
    label-id order). `thresholds` (label-id order) come from the run: 0.5, or tuned on its validation split."""

    def __init__(self, folder: str, cfg: dict):
        super().__init__(folder, cfg)
        names = [self.id2label[i] for i in range(len(self.id2label))]
        given = cfg.get("thresholds") or {}
        self.names, self.thresholds = names, np.array([float(given.get(n, 0.5)) for n in names], dtype=np.float32)

    def predict(self, model_input) -> pd.DataFrame:
        import torch

        texts, pairs = self.inputs(model_input)
        probs = self.outputs(texts, torch.sigmoid, pairs)
        return pd.DataFrame({
            "labels": [[n for n, hit in zip(self.names, row >= self.thresholds) if hit] for row in probs],
            "probabilities": [row.astype(np.float64).tolist() for row in probs],
        })


def _truncation():
    """text/truncation.py: the copy logged with the model, else the package's (as _token_spans)."""
    try:
        import truncation
    except ImportError:
        from spark_tuning.text import truncation
    return truncation


def _token_spans():
    """text/token_spans.py: the copy logged with the model (MLflow puts code_paths on sys.path), else the
    package's (a model class used directly, e.g. by bench/gpu_check.py)."""
    try:
        import token_spans
    except ImportError:
        from spark_tuning.text import token_spans
    return token_spans


class TextTagger:
    """Hugging Face token classifier (task token_classification): returns `entities` per text, each
    {label, start, end, text, score}: character offsets into the text, score the mean probability of the
    entity's units. Texts are cut into the run's overlapping windows, each token predicted in the window
    that owns it, and units decoded with seqeval's rules, as the run's evaluation did (token_spans.py)."""

    def __init__(self, folder: str, cfg: dict):
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        self.spans = _token_spans()
        self.max_length = int(cfg.get("max_length", 512))
        self.batch_size = int(cfg.get("batch_size", 64))
        self.unit, self.stride = cfg.get("unit", "word"), int(cfg.get("stride", 0))
        self.device, self.precision = serving_placement(cfg.get("precision", "fp32"), cfg.get("device", "auto"))
        self.max_chars = int(cfg.get("max_chars", 100_000))
        self.column = cfg.get("text_column", "text")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer = self.spans.plain_tokenizer(tokenizer.backend_tokenizer.to_str())
        self.model = AutoModelForTokenClassification.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True).to(self.device).eval()
        self.names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.model.config.pad_token_id or 0)
        self.lock = threading.Lock()

    def predict(self, model_input) -> pd.DataFrame:
        texts = texts_from(model_input, self.column, self.max_chars)
        docs = [self.spans.encode(self.tokenizer, t, self.unit, self.max_length, self.stride) for t in texts]
        windows = [(d, w) for d, (_, wins) in enumerate(docs) for w in wins]
        probs = self.window_probabilities([w for _, w in windows])
        per_doc: list[tuple[list, list]] = [([], []) for _ in docs]
        for (d, w), p in zip(windows, probs):
            per_doc[d][0].append(w["units"])
            per_doc[d][1].append(p)
        out = []
        for text, (spans, _), (units, ps) in zip(texts, docs, per_doc):
            tags, scores = self.spans.unit_predictions(len(spans), units, ps)
            out.append(self.spans.entities(text, spans, tags, scores, self.names))
        return pd.DataFrame({"entities": out})

    def window_probabilities(self, windows: list[dict]) -> list[np.ndarray]:
        """Per window, the tag probabilities of the tokens it owns first (its `units`, in order); batched
        by length as the run's evaluation batches."""
        import torch

        lengths = np.array([len(w["input_ids"]) for w in windows])
        order = np.lexsort((np.arange(len(windows)), lengths))
        out: list = [None] * len(windows)
        with self.lock, torch.inference_mode(), autocast(self.precision, self.device):
            for start in range(0, len(order), self.batch_size):
                index = order[start:start + self.batch_size]
                width = int(lengths[index].max())
                input_ids = np.full((len(index), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(index), width), dtype=np.int64)
                for row, i in enumerate(index):
                    input_ids[row, :lengths[i]] = windows[i]["input_ids"]
                    mask[row, :lengths[i]] = 1
                logits = self.model(input_ids=torch.from_numpy(input_ids).to(self.device),
                                    attention_mask=torch.from_numpy(mask).to(self.device)).logits
                p = torch.softmax(logits.float(), dim=-1).cpu().numpy()
                for row, i in enumerate(index):
                    out[i] = p[row][windows[i]["positions"]]
        return out


class TextGenerator:
    """Causal LM / SFT: a prompt in, its greedy continuation out (`generated_text`).

    sft: the text is the user's message, rendered as training rendered prompts (the tokenizer's chat
    template with its assistant header, or plain "user: ...\nassistant: " lines); on classification data it
    is first put into the run's prompt (data.sft_prompt). Such a model also returns label, label_id,
    probability and probabilities by the rule of the run's own evaluation: the label whose first response
    token the model scores highest right after the prompt (probabilities: softmax over those tokens).
    causal_lm: the text is continued as it is. Prompts are cut to leave room for max_new_tokens within
    max_length, as the LM tasks' prompt_ids (tasks/) cut the run's own samples: causal_lm keeps the text's end; sft
    keeps the prompt's first third and its end, as training cut its prompts (lm_data.truncate_pair)."""

    def __init__(self, folder: str, cfg: dict):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.task = cfg["task"]
        self.max_length = int(cfg.get("max_length", 512))
        self.max_new_tokens = int(cfg.get("max_new_tokens", 32))
        self.max_chars = int(cfg.get("max_chars", 100_000))
        self.column = cfg.get("text_column", "text")
        self.chat_template = bool(cfg.get("chat_template", False))
        self.prompt_template = cfg.get("prompt_template")
        self.label_names = list(cfg.get("label_names") or [])
        self.label_tokens = [int(t) for t in cfg.get("label_first_tokens") or []]
        if self.max_new_tokens < 1:
            raise MlflowException(f"model_config max_new_tokens = {self.max_new_tokens} must be at least 1")
        self.device = serving_placement("fp32", cfg.get("device", "auto"))[0]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                          use_safetensors=True).to(self.device).eval()
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.lock = threading.Lock()  # one generation at a time, as for the classifier

    def prompt_ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        # Room for max_new_tokens, as lm_data.truncate_pair leaves room for a response of that length.
        budget = self.max_length - min(self.max_new_tokens, self.max_length - self.max_length // 2)
        if self.task == "causal_lm":  # a continuation depends on the text's end
            return tok(text, add_special_tokens=True)["input_ids"][-budget:]
        if self.prompt_template:
            text = self.prompt_template.replace("{text}", text)
        if self.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = f"user: {text}\nassistant: "
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > budget:  # cut in the middle: the instruction and the assistant header survive
            head = budget // 3
            ids = ids[:head] + ids[len(ids) - (budget - head):]
        return ids

    def generate(self, ids: list[int]) -> tuple[str, np.ndarray | None]:
        import torch

        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with self.lock, torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                      eos_token_id=self.tokenizer.eos_token_id, use_cache=True,
                                      return_dict_in_generate=True, output_logits=bool(self.label_tokens))
        text = self.tokenizer.decode(out.sequences[0, len(ids):], skip_special_tokens=True)
        if not self.label_tokens:
            return text, None
        first = out.logits[0][0, self.label_tokens].float()  # the step right after the prompt
        return text, torch.softmax(first, dim=-1).cpu().numpy()

    def predict(self, model_input) -> pd.DataFrame:
        texts = texts_from(model_input, self.column, self.max_chars)
        prompts = [self.prompt_ids(t) for t in texts]
        for i, ids in enumerate(prompts):
            if not ids:
                raise BadInput(f"row {i}: the prompt has no tokens: send some text to continue")
        answers = [self.generate(ids) for ids in prompts]
        out = pd.DataFrame({"generated_text": [text for text, _ in answers]})
        if self.label_tokens:
            probs = np.stack([p for _, p in answers])
            ids = probs.argmax(axis=1)
            out["label"] = [self.label_names[int(i)] for i in ids]
            out["label_id"] = ids.astype(np.int64)
            out["probability"] = probs[np.arange(len(ids)), ids].astype(np.float64)
            out["probabilities"] = [row.astype(np.float64).tolist() for row in probs]
        return out


TASKS = {"classification": TextClassifier, "multilabel_classification": TextMultiLabel, "regression": TextRegressor,
         "token_classification": TextTagger, "causal_lm": TextGenerator, "sft": TextGenerator}


if mlflow is not None:
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
