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
