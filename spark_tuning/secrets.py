"""Secrets: read from the environment or a Databricks secret scope, never from a config file; and kept out
of logs, MLflow params and saved files.

A config names a secret by reference, never by value:
    model.hub_token: env:HF_TOKEN             # an environment variable
    model.hub_token: secret:my-scope/hf-token # a Databricks secret scope and key
A config value that looks like a credential (a Hugging Face, Databricks, OpenAI, AWS or Azure key, a
password inside a URL such as https://user:password@host/ or postgresql://u:p@db/, a signed URL's
signature) is refused when the config is loaded; its value is never repeated in the message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any, Iterable, Iterator, Optional

from spark_tuning.errors import InputError

# What credentials look like. Deliberately specific: paths, hashes of 40 hex digits and run ids must pass.
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    ("a Databricks token", re.compile(r"\bdapi[0-9a-f]{32}(-\d)?\b")),
    ("an OpenAI key", re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}\b")),
    ("an AWS access key", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
    ("an Azure key", re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32}(?![0-9a-fA-F])|\b[A-Za-z0-9+/]{86}==")),
    ("a JSON web token", re.compile(r"\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.")),
    # user:password@ in a URL's authority (abfss://container@account... has no password and passes).
    ("a password inside a URL", re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:[^/\s@]+@")),
    ("a signed URL's signature", re.compile(r"[?&](sig|X-Amz-Signature|X-Goog-Signature)=[^&\s]+", re.IGNORECASE)),
]
URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)[^/\s@]+@")
URL_SIGNATURE = re.compile(r"([?&](?:sig|X-Amz-Signature|X-Goog-Signature)=)[^&\s]+", re.IGNORECASE)
# Environment variables whose values are treated as secrets and scrubbed from everything written.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|_KEY$|CREDENTIAL", re.IGNORECASE)
MASK = "***"
# spark.conf keys whose values are credentials (S3, Azure storage account keys and SAS tokens, GCS, JDBC).
SECRET_CONF_KEY = re.compile(r"secret|password|passwd|token|credential|\.sas\b|sas\.|account\.key|access\.key|"
                             r"private\.key|\.key$", re.IGNORECASE)
# ... but not the settings beside them that name a mechanism, not a value (a credentials provider class, an auth type).
NOT_A_SECRET_KEY = re.compile(r"(provider|\.type|\.enabled|\.class|\.mode|\.path|\.file|\.endpoint|\.url)$",
                              re.IGNORECASE)
_RESOLVED: set[str] = set()  # secret values resolved from references in this process: scrubbed like env secrets
# The resolved model.hub_token, handed by the driver to the processes a run starts (Spark's Python workers,
# the training processes): neither has the driver's environment nor, on Databricks, a secret scope client.
HUB_TOKEN_ENV = "SPARK_TUNING_HUB_TOKEN"
_SHARING: list = []  # the runs (shared_with_workers) in progress in this process


def spark_conf_problems(conf: dict) -> list[str]:
    """spark.conf values under keys that name a secret must be references (env:NAME, secret:scope/key)."""
    return [f"spark.conf[{key!r}] names a secret and holds its value: secrets never go in a config file; "
            f"write it as env:NAME (an environment variable) or secret:scope/key (a Databricks secret scope), "
            "resolved on the driver when the Spark session starts"
            for key, value in (conf or {}).items()
            if SECRET_CONF_KEY.search(str(key)) and not NOT_A_SECRET_KEY.search(str(key))
            and not str(value).startswith(("env:", "secret:"))]


def resolve_conf(conf: dict) -> dict:
    """spark.conf with its env:/secret: references resolved (values then scrubbed from every log)."""
    out = {}
    for key, value in conf.items():
        if isinstance(value, str) and value.startswith(("env:", "secret:")) and SECRET_CONF_KEY.search(str(key)):
            value = resolve(value, f"spark.conf[{key!r}]")
            _RESOLVED.add(value)
        out[key] = value
    return out


def looks_like_secret(value: str) -> Optional[str]:
    for what, pattern in PATTERNS:
        if pattern.search(value):
            return what
    return None


def config_problems(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Config values that look like credentials, as ConfigError problems."""
    problems = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            problems += config_problems(value, name + ".")
        elif isinstance(value, (list, tuple)):
            problems += config_problems({f"{key}[{i}]": v for i, v in enumerate(value)}, prefix)
        elif isinstance(value, str):
            what = looks_like_secret(value)
            if what:
                where = ("the library's own credential mechanism (MLflow: MLFLOW_TRACKING_USERNAME / "
                         "MLFLOW_TRACKING_PASSWORD or a Databricks profile; storage: the cluster's credentials or "
                         "spark.conf keys whose values are env: or secret: references)"
                         if "URL" in what else "a reference, env:NAME or secret:scope/key, where the setting takes one")
                problems.append(
                    f"{name} looks like {what}: secrets never go in a config file. Put it in an environment "
                    f"variable or a Databricks secret scope, and use {where}"
                )
    return problems


def _environ_snapshot() -> dict[str, str]:
    """A copy of the environment. Iterating os.environ while another thread (MLflow's telemetry does this)
    sets or deletes a variable raises KeyError or RuntimeError; copying again is the way out."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def secret_values(environ: Optional[dict[str, str]] = None) -> list[str]:
    env = _environ_snapshot() if environ is None else environ
    found = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 8}
    found |= {v for v in env.values() if len(v) >= 20 and looks_like_secret(v)}
    found |= {v for v in _RESOLVED if len(v) >= 4}
    return sorted(found, key=len, reverse=True)


def scrub(text: str, values: Optional[Iterable[str]] = None) -> str:
    for value in secret_values() if values is None else values:
        text = text.replace(value, MASK)
    for _, pattern in PATTERNS[:4]:  # well-known token formats, whatever their source
        text = pattern.sub(MASK, text)
    text = URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", text)  # https://user:***@host
    return URL_SIGNATURE.sub(lambda m: m.group(1) + MASK, text)


class ScrubFilter(logging.Filter):
    """Masks secret values in every log record that passes through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # log.exception: the traceback is text too
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install_log_scrubbing() -> None:
    """Scrub every handler of the root logger, and uncaught exceptions' tracebacks (sys.excepthook)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
    install_excepthook()


def install_excepthook() -> None:
    """Uncaught exceptions' tracebacks, scrubbed. Only Python's default hook is replaced: a hook installed
    before (e.g. faults.exit_without_teardown's, which notes the failure for the exit code) is kept, and
    whoever installs one after this call chains to the scrubbed one."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = scrubbed_excepthook


def scrubbed_excepthook(kind, value, tb) -> None:
    import traceback

    sys.stderr.write(scrub("".join(traceback.format_exception(kind, value, tb))))


def hub_token(reference: Optional[str]) -> Optional[str]:
    """model.hub_token's value: in a process the driver started, from the environment it was given; on the
    driver, resolved from its reference once per run (shared_with_workers keeps it for the run's workers)."""
    if reference is None:
        return None
    shared = os.environ.get(HUB_TOKEN_ENV)
    if shared:
        return shared
    value = resolve(reference, "model.hub_token")
    _RESOLVED.add(value)
    if _SHARING:
        os.environ[HUB_TOKEN_ENV] = value  # torchrun's processes inherit it; see share_with_spark
        for share in _SHARING:
            share.publish()
    return value


class _Share:
    def __init__(self):
        self.sessions: list = []
        self.replaced: dict = {}  # id(SparkContext) -> (the context, what its environment held before)

    def publish(self) -> None:
        value = os.environ.get(HUB_TOKEN_ENV)
        if not value:
            return  # nothing resolved: the SparkContext is not touched (Spark Connect has none)
        for spark in self.sessions:
            sc = spark.sparkContext
            self.replaced.setdefault(id(sc), (sc, sc.environment.get(HUB_TOKEN_ENV)))
            sc.environment[HUB_TOKEN_ENV] = value

    def add_spark(self, spark) -> None:
        self.sessions.append(spark)
        self.publish()

    def restore(self) -> None:
        for sc, before in self.replaced.values():
            if before is None:
                sc.environment.pop(HUB_TOKEN_ENV, None)
            else:
                sc.environment[HUB_TOKEN_ENV] = before


def environment_without_shared() -> dict[str, str]:
    """This process's environment for a helper process that loads no model (the watchdog, a model server):
    without the hub token handed to the run's workers."""
    return {k: v for k, v in _environ_snapshot().items() if k != HUB_TOKEN_ENV}


@contextlib.contextmanager
def shared_with_workers() -> Iterator[_Share]:
    """For one run: a secret reference resolved on the driver (hub_token) reaches the processes the run
    starts through their environment, not by being resolved again there (a training process or a Spark
    executor has no secret scope, nor the driver's environment variables). Call `.add_spark(spark)` once
    the session exists: Spark's Python workers (pandas UDFs, TorchDistributor's tasks on executors) get the
    SparkContext's `environment`; local training processes inherit this process's. Both are cleared on exit."""
    share = _Share()
    before = os.environ.get(HUB_TOKEN_ENV)
    _SHARING.append(share)
    try:
        yield share
    finally:
        _SHARING.remove(share)
        share.restore()
        if before is None:
            os.environ.pop(HUB_TOKEN_ENV, None)
        else:
            os.environ[HUB_TOKEN_ENV] = before


def resolve(reference: Optional[str], setting: str) -> Optional[str]:
    """`env:NAME` or `secret:scope/key` -> the secret's value (None when no reference is given)."""
    if reference is None:
        return None
    kind, _, name = reference.partition(":")
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise InputError(f"{setting} = {reference!r}: environment variable {name} is not set: export it first")
        return value
    if kind == "secret":
        scope, _, key = name.partition("/")
        try:
            from pyspark.dbutils import DBUtils  # Databricks only
            from pyspark.sql import SparkSession

            return DBUtils(SparkSession.getActiveSession()).secrets.get(scope=scope, key=key)
        except ImportError:
            raise InputError(f"{setting} = {reference!r}: secret scopes exist only on Databricks; "
                             "use env:NAME here") from None
    raise InputError(f"{setting} = {reference!r} must be a reference, env:NAME or secret:scope/key")
