"""Secrets come from the environment and never reach logs, MLflow or output files. A whole job run with
secrets planted in its environment is tests/test_quickstart.py (the README's first command)."""

from __future__ import annotations

import io
import logging
import os

import pytest

HUB_TOKEN = "hf_" + "Zq7" * 12  # the shape of a real Hugging Face token
OTHER_KEY = "s3cr3t-value-planted-by-the-test"


def test_config_values_that_look_like_keys_are_refused():
    from spark_tuning.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.hub_token={HUB_TOKEN}", "tracking.experiment=dapi" + "ab12" * 8])
    msg = str(err.value)
    assert "looks like a Hugging Face token" in msg and "looks like a Databricks token" in msg
    assert "must be a reference" in msg
    assert HUB_TOKEN not in msg  # the error names the setting, not the secret
    cfg = load_config(None, ["model.hub_token=env:HF_TOKEN"])  # a reference is fine
    assert cfg.model.hub_token == "env:HF_TOKEN"


def test_log_records_are_scrubbed(monkeypatch):
    from spark_tuning.secrets import ScrubFilter, resolve

    monkeypatch.setenv("MY_SERVICE_API_KEY", OTHER_KEY)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ScrubFilter())
    logger = logging.getLogger("secret-test")
    logger.addHandler(handler)
    try:
        logger.warning("calling with %s and %s", OTHER_KEY, HUB_TOKEN)
    finally:
        logger.removeHandler(handler)
    assert OTHER_KEY not in stream.getvalue() and HUB_TOKEN not in stream.getvalue()
    assert "***" in stream.getvalue()
    assert resolve("env:MY_SERVICE_API_KEY", "x") == OTHER_KEY


def test_secret_values_survive_another_thread_changing_the_environment(monkeypatch):
    """MLflow's telemetry thread sets and deletes variables while the job scrubs its params: reading the
    environment must not fail with KeyError (a real run died of it)."""
    import threading
    import time

    from spark_tuning.secrets import secret_values

    monkeypatch.setenv("MY_API_TOKEN", "tok-1234567890")
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            os.environ[f"_CHURN_{i % 50}"] = "x" * 30
            os.environ.pop(f"_CHURN_{(i + 25) % 50}", None)
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert "tok-1234567890" in secret_values()
    finally:
        stop.set()
        thread.join()
        for i in range(50):
            os.environ.pop(f"_CHURN_{i}", None)


def test_the_hub_token_is_resolved_once_on_the_driver_and_reaches_spark_workers(spark, monkeypatch):
    """A Spark Python worker (a tokenizing UDF; on a cluster, TorchDistributor's training tasks too) has
    neither a secret scope nor the driver's environment: a variable set after the session started is not
    there. The driver resolves model.hub_token once and hands the value over through the SparkContext's
    environment; it is gone again after the run."""
    from spark_tuning.config import load_config
    from spark_tuning.model.sources import ModelSource
    from spark_tuning.secrets import HUB_TOKEN_ENV, scrub, shared_with_workers

    monkeypatch.setenv("ST_TEST_HUB_TOKEN", OTHER_KEY)  # the driver's environment, after Spark started
    model_cfg = load_config(None, ["model.source=org/private-model", "model.hub_token=env:ST_TEST_HUB_TOKEN"]).model
    hub = ModelSource("org/private-model", is_local=False)

    def token_seen_by_a_worker(_):
        import os

        return [os.environ.get("ST_TEST_HUB_TOKEN"), hub.load_kwargs(model_cfg)["token"]]

    sc = spark.sparkContext
    with shared_with_workers() as share:
        assert hub.load_kwargs(model_cfg)["token"] == OTHER_KEY  # preflight, on the driver
        share.add_spark(spark)
        [[driver_env_there, token_there]] = sc.parallelize([0], 1).map(token_seen_by_a_worker).collect()
        assert driver_env_there is None  # the worker really lacks the driver's variable
        assert token_there == OTHER_KEY
        monkeypatch.delenv("ST_TEST_HUB_TOKEN")  # resolved once: later loads on the driver need no reference
        assert hub.load_kwargs(model_cfg)["token"] == OTHER_KEY
    assert HUB_TOKEN_ENV not in os.environ and HUB_TOKEN_ENV not in sc.environment
    assert OTHER_KEY not in scrub(f"token={OTHER_KEY}")
