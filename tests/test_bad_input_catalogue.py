"""The bad-input catalogue: one row per bad input across config, data, model and output. Each is run
through the CLI entry point (in-process, sharing the test SparkSession) and must end with its own clear
message, exit code 2 for input errors (1 for runtime failures), and no earlier output changed."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import pytest

from conftest import make_reviews


@dataclass
class Case:
    name: str
    setup: Callable  # (tmp_path, env) -> list of --set overrides (and may write files)
    message: str  # a fragment of the one message the user must see
    code: int = 2
    flags: tuple = ()  # command-line flags beside the --set overrides (e.g. --overwrite)
    absent: str = ""  # what the message must not suggest (e.g. --overwrite, where it would not help)


def reviews(tmp, rows=None, name="d.jsonl"):
    p = tmp / name
    p.write_text("".join(json.dumps(r) + "\n" for r in (rows or make_reviews(40))))
    return f"data.source={p}"


def parquet(tmp, df, name="d.parquet"):
    df.to_parquet(tmp / name)
    return f"data.source={tmp / name}"


def model_copy(tmp, env, drop=(), edit=None):
    folder = tmp / "model-copy"
    shutil.copytree(env["tiny"], folder)
    for name in drop:
        os.remove(folder / name)
    if edit:
        edit(folder)
    return f"model.source={folder}"


def no_pad_tokenizer(folder):
    """A valid fast tokenizer that declares no special tokens at all (no pad, eos or unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (folder / name).exists():
            os.remove(folder / name)
    words = sorted({w for r in make_reviews(40) for w in r["text"].split()})
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core).save_pretrained(str(folder))


def pickle_only(folder):
    os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")


def existing_model(tmp, marker=True):
    """A finished run's model (spark-tuning's marker lists its files), or (marker False) someone's model folder."""
    out = tmp / "out" / "model"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "metrics.json").write_text("{}")
    if marker:
        (out / ".spark-tuning.json").write_text(json.dumps({"names": ["config.json", "metrics.json"]}))
    return []


def foreign_files(tmp, into_model=False):
    """Someone's file in output_dir (into_model: added to a finished model of spark-tuning's)."""
    if into_model:
        existing_model(tmp)
    else:
        (tmp / "out" / "model").mkdir(parents=True)
    (tmp / "out" / "model" / "thesis.txt").write_text("mine")
    return []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output_in_use(tmp):
    """Another run (this test process, alive) holds output_dir's lock."""
    from spark_tuning.deploy.serving import process_identity

    (tmp / "out").mkdir(parents=True, exist_ok=True)
    start, cmdline = process_identity(os.getpid())
    (tmp / "out" / ".model.lock").write_text(json.dumps({"pid": os.getpid(), "process_start": start,
                                                         "cmdline": cmdline, "started": 0}))
    return []


def output_holds_data(tmp):
    """output_dir is the folder the data source lives in."""
    (tmp / "out" / "data").mkdir(parents=True)
    p = tmp / "out" / "data" / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in make_reviews(40)))
    return [f"data.source={p}", f"output_dir={tmp / 'out' / 'data'}"]


def latin1_csv(tmp):
    p = tmp / "d.csv"
    rows = "text,label\n" + "".join(f"caf\xe9 review {i},{i % 2}\n" for i in range(20))
    p.write_bytes(rows.encode("latin-1"))
    return f"data.source={p}"


def corrupt_parquet(tmp):
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_parquet(tmp / "ok.parquet")
    data = (tmp / "ok.parquet").read_bytes()
    (tmp / "bad.parquet").write_bytes(data[: len(data) // 2])
    return f"data.source={tmp / 'bad.parquet'}"


def empty_parquet(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}),
                   tmp / "empty.parquet")
    return f"data.source={tmp / 'empty.parquet'}"


def under_a_file(tmp):
    (tmp / "a-file").write_text("x")
    return [f"output_dir={tmp / 'a-file' / 'model'}"]


CASES = [
    # config
    Case("unknown key", lambda t, e: ["train.lerning_rate=1e-4"], "did you mean 'train.learning_rate'"),
    Case("wrong type", lambda t, e: ["train.epochs=two"], "train.epochs = 'two' has the wrong type"),
    Case("zero batch size", lambda t, e: ["train.batch_size=0"], "train.batch_size = 0 must be greater than 0"),
    Case("negative learning rate", lambda t, e: ["train.learning_rate=-0.1"], "train.learning_rate = -0.1"),
    Case("unknown precision", lambda t, e: ["train.precision=fp8"], "train.precision = 'fp8' is not one of"),
    Case("validation fraction above 1", lambda t, e: ["data.validation_fraction=1.5"], "must be between 0 and 1"),
    Case("same text and label column", lambda t, e: ["data.label_column=text"], "they must differ"),
    Case("a token in the config", lambda t, e: ["run_name=hf_" + "a1B2" * 9], "looks like a Hugging Face token"),
    Case("a key in the config", lambda t, e: ["tracking.experiment=0123456789abcdef0123456789abcdef"],
         "looks like an Azure key"),
    Case("truncation mode misspelt", lambda t, e: ["data.truncation=head-tail"],
         "data.truncation = 'head-tail' is not one of head, tail, head_tail (did you mean 'head_tail'?)"),
    Case("head_tokens not below max_length", lambda t, e: ["data.truncation=head_tail", "data.max_length=64",
                                                          "data.head_tokens=64"],
         "must be at least 1 and less than data.max_length = 64"),
    Case("head_tokens without head_tail", lambda t, e: ["data.head_tokens=16"],
         "is only read by data.truncation: head_tail"),
    Case("truncation for a task that cuts its own way", lambda t, e: ["task=causal_lm", "data.truncation=tail"],
         "task causal_lm cuts its rows its own way"),
    Case("early stopping on a metric the task does not log", lambda t, e: ["train.early_stopping.patience=2",
                                                                          "train.early_stopping.metric=perplexity"],
         "'perplexity' is not a validation metric of task classification: one of eval_loss, eval_accuracy, eval_f1"),
    Case("keep_best without checkpoints", lambda t, e: ["train.keep_best=true", "checkpoint.enabled=false"],
         "train.keep_best = true keeps the best model as a checkpoint while training: set checkpoint.enabled: true"),
    # resources
    Case("more processes than cores", lambda t, e: ["distributed.num_processes=512"], "more than the"),
    Case("GPU where there is none", lambda t, e: ["distributed.use_gpu=true"], "no GPU is visible"),
    Case("fsdp with one process", lambda t, e: ["distributed.strategy=fsdp", "distributed.num_processes=1"],
         "one process has nothing to shard the model over"),
    Case("fsdp block class not in the model", lambda t, e: ["distributed.strategy=fsdp",
                                                           'distributed.fsdp.block_class=["NoSuchLayer"]'],
         "names no module of BertForSequenceClassification"),
    Case("fsdp with fp16", lambda t, e: ["distributed.strategy=fsdp", "train.precision=fp16"],
         "fp16 loss scaling over sharded gradients is not supported"),
    Case("fsdp CPU offload on CPUs", lambda t, e: ["distributed.strategy=fsdp", "distributed.fsdp.cpu_offload=true"],
         "the weights are in host memory already"),
    # model
    Case("model folder missing", lambda t, e: [f"model.source={t / 'nope'}"], "does not exist"),
    Case("model folder without weights", lambda t, e: [model_copy(t, e, drop=["model.safetensors"])],
         "holds no weights"),
    Case("pickle-only weights", lambda t, e: [model_copy(t, e, edit=pickle_only)], "pickle-based weights"),
    Case("tokenizer without a pad token", lambda t, e: [model_copy(t, e, edit=no_pad_tokenizer)],
         "no pad, eos or unk token"),
    Case("max_length above the model's positions", lambda t, e: ["data.max_length=4096"],
         "data.max_length = 4096 is more than"),
    # data
    Case("data path missing", lambda t, e: [f"data.source={t / 'missing.parquet'}"], "no such file"),
    Case("missing text column", lambda t, e: [reviews(t), "data.text_column=body"], "it has ['label', 'text']"),
    Case("missing label column", lambda t, e: [reviews(t), "data.label_column=stars"], "data.label_column = 'stars'"),
    Case("text column is not text", lambda t, e: [parquet(t, pd.DataFrame({"text": [1, 2], "label": [0, 1]}))],
         "not text"),
    Case("only null and empty texts", lambda t, e: [reviews(t, [{"text": None, "label": 1}, {"text": "", "label": 0},
                                                                 {"text": "   ", "label": 1}])], "no rows left"),
    Case("one class only", lambda t, e: [reviews(t, [{"text": f"t {i}", "label": "pos"} for i in range(30)])],
         "single class"),
    Case("labels out of range", lambda t, e: [reviews(t, [{"text": f"t {i}", "label": i % 3} for i in range(30)]),
                                              "data.label_names=[neg, pos]"], "labels out of range: [2]"),
    Case("labels of mixed types", lambda t, e: [reviews(t, [{"text": f"t {i}", "label": [0, "pos"][i % 2]}
                                                            for i in range(30)])], "mixed types"),
    Case("empty dataset", lambda t, e: [empty_parquet(t)], "holds no rows"),
    Case("corrupt Parquet file", lambda t, e: [corrupt_parquet(t)], "could not be read as parquet"),
    Case("non-UTF-8 bytes in a CSV", lambda t, e: [latin1_csv(t)], "not valid UTF-8"),
    Case("eval_split on a file", lambda t, e: [reviews(t), "data.eval_split=test"], "names a split"),
    # output
    Case("output holds another run's model", lambda t, e: existing_model(t), "already holds a model"),
    Case("output holds someone's files", lambda t, e: foreign_files(t), "(thesis.txt): spark-tuning never replaces",
         absent="pass --overwrite"),
    Case("output holds someone's files, --overwrite", lambda t, e: foreign_files(t), "did not write (thesis.txt)",
         flags=("--overwrite",), absent="pass --overwrite"),
    Case("a file added to a finished model, --overwrite", lambda t, e: foreign_files(t, into_model=True),
         "write (thesis.txt): spark", flags=("--overwrite",), absent="pass --overwrite"),
    Case("someone's model folder, --overwrite", lambda t, e: existing_model(t, marker=False),
         "did not write (config.json, metrics.json)", flags=("--overwrite",), absent="pass --overwrite"),
    Case("tracking server does not answer", lambda t, e: [f"tracking.tracking_uri=http://127.0.0.1:{_free_port()}"],
         "does not answer"),
    Case("output_dir in use by another run", lambda t, e: output_in_use(t), "is in use by another run: pid"),
    Case("output_dir holds the data source", lambda t, e: output_holds_data(t), "which spark-tuning never deletes",
         flags=("--overwrite",), absent="pass --overwrite"),
    Case("output_dir is the checkout", lambda t, e: [f"output_dir={os.path.dirname(os.path.dirname(__file__))}"],
         "is the spark-tuning checkout", flags=("--overwrite",), absent="pass --overwrite"),
    Case("output under a file", lambda t, e: under_a_file(t), "cannot be written"),
    # weights cut short: found from the file's header on the driver, before Spark starts
    Case("truncated weights", lambda t, e: [model_copy(t, e, edit=lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:300]))], "are cut short or damaged"),
    Case("weights missing their last bytes", lambda t, e: [model_copy(t, e, edit=lambda f: (f / "model.safetensors")
         .write_bytes((f / "model.safetensors").read_bytes()[:-1]))], "its tensors need"),
]


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 25
    assert len({c.message for c in CASES}) == len(CASES)  # each input has its own message


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(spark, tmp_path, capsys, reviews_jsonl, tiny_bert_dir, case):
    from spark_tuning import cli

    earlier = tmp_path / "out" / "earlier-run"
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_bytes(b"precious")
    sets = {"output_dir": str(tmp_path / "out" / "model"), "data.source": reviews_jsonl,
            "model.source": tiny_bert_dir, "data.max_length": "64", "train.epochs": "1",
            "distributed.num_processes": "2", "tracking.log_model": "false"}
    for item in case.setup(tmp_path, {"tiny": tiny_bert_dir}):
        key, _, value = item.partition("=")
        sets[key] = value
    before = set(os.listdir(tmp_path / "out"))
    args = ["finetune", *case.flags] + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == case.code, err[-2000:]
    message = err.split("spark-tuning: error:")[-1]
    assert case.message in message, message
    assert not case.absent or case.absent not in message, message  # no advice that would not help
    # Spark's own words only: no py4j call ids, no Java class names.
    assert not re.search(r"\bo\d+\.\w+|java\.|org\.apache|py4j", message), message
    assert (earlier / "model.safetensors").read_bytes() == b"precious"
    after = set(os.listdir(tmp_path / "out"))
    assert after - before <= {"mlflow.db", "mlartifacts", ".staging"}, after - before  # no output folder left


def test_huge_texts_are_clipped_not_refused(spark, tmp_path, minilm_dir, caplog):
    """A 1 MB review is accepted: it is clipped before tokenizing (max_length tokens need far fewer
    characters) and the data stage says how many texts were that long."""
    import logging

    from spark_tuning.data import dataset
    from spark_tuning.config import DataConfig, ModelConfig
    from spark_tuning.model.sources import ModelSource
    from spark_tuning.text.tokenize import tokenize

    rows = make_reviews(20) + [{"text": "endless " * 131_072, "label": "positive"}]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        prepared = dataset.prepare(spark, DataConfig(source=str(p), validation_fraction=0.1), seed=1)
    assert "1 texts are longer than" in caplog.text
    both = prepared.train.unionByName(prepared.eval)
    out = tokenize(both, ModelSource(minilm_dir, True), ModelConfig(source=minilm_dir), max_length=128)
    assert max(r.length for r in out.select("length").collect()) == 128


def test_serving_port_already_in_use(tmp_path, capsys, tiny_bert_dir):
    """The catalogue's serving row: a busy port is refused before any server starts, with exit code 2."""
    import socket

    from spark_tuning import cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code = cli.main(["serve", "--model-uri", tiny_bert_dir, "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in err
