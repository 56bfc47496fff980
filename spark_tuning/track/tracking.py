"""MLflow: the driver opens the run, logs into it and closes it.

The training processes never talk to MLflow. Rank 0 appends what it would log (per-step metrics, params,
tables) as JSON lines to an events file in the job's staging folder (`RankZeroLogger`); a thread of the
driver (`relay`) forwards each line into the run within half a second. So a training process imports no
MLflow (4 s of start-up and 1.5 s of exit on these CPUs, while the other ranks wait) and needs no route to
the tracking server: on a cluster, only the driver does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, TYPE_CHECKING

from spark_tuning.paths import on_databricks, output_root
from spark_tuning.secrets import scrub

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import Config


@dataclass(frozen=True)
class RunRef:
    tracking_uri: str
    run_id: str
    experiment_id: str


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if on_databricks():
        return "databricks"
    # An embedded store beside the outputs: no server to start, `mlflow ui` reads it.
    return "sqlite:///" + os.path.join(output_root(cfg.output_dir), "mlflow.db")


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:") or uri.startswith("file:") or uri.startswith("/"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open the run in the MLflow UI at {uri}"


def check_reachable(cfg: Config, timeout_s: float = 10.0) -> None:
    """A tracking server (http/https URI) must answer before any work starts: a clear error in seconds,
    not after the data stage and MLflow's retries."""
    import urllib.error
    import urllib.request

    from spark_tuning.errors import InputError

    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            if r.status < 500:
                return
            reason = f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return  # it answers (a proxy may not route /health): good enough
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise InputError(f"tracking.tracking_uri = {scrub(uri)!r} does not answer ({reason}): start the MLflow server, "
                     "fix the URI, or leave tracking.tracking_uri unset for a local store beside the output")


def start_run(cfg: Config, run_name: Optional[str] = None, tags: Optional[dict[str, str]] = None) -> RunRef:
    """A new run in cfg's experiment (made if missing), named `run_name` (default: the config's run name)."""
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = "file://" + os.path.join(output_root(cfg.output_dir), "mlartifacts")
        exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name or cfg.resolved_run_name,
                            tags={"spark_tuning.task": cfg.task, **(tags or {})})
    return RunRef(uri, run.info.run_id, exp_id)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = scrub(str(v))[:6000]  # config values were checked; this is a second guard
    return out


def log_params(ref: RunRef, params: dict[str, Any]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flatten(params).items()]
    client = MlflowClient(ref.tracking_uri)
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(ref.run_id, params=items[i:i + 100])


def log_metrics(ref: RunRef, metrics: dict[str, float], step: Optional[int] = None) -> None:
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    if items:
        MlflowClient(ref.tracking_uri).log_batch(ref.run_id, metrics=items)


def log_artifacts(ref: RunRef, local_dir: str, artifact_path: Optional[str] = None) -> None:
    from mlflow import MlflowClient

    MlflowClient(ref.tracking_uri).log_artifacts(ref.run_id, local_dir, artifact_path)


def log_artifact(ref: RunRef, path: str, artifact_path: Optional[str] = None) -> None:
    from mlflow import MlflowClient

    MlflowClient(ref.tracking_uri).log_artifact(ref.run_id, path, artifact_path)


def end_run(ref: RunRef, status: str) -> None:
    """status: FINISHED or FAILED."""
    from mlflow import MlflowClient

    MlflowClient(ref.tracking_uri).set_terminated(ref.run_id, status=status)


def set_tag(ref: RunRef, key: str, value: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(ref.tracking_uri).set_tag(ref.run_id, key, value)


def close_stale_run(marker: dict) -> None:
    """Mark an earlier run FAILED if it is still RUNNING (its driver was killed and could not say so)."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(marker["tracking_uri"])
        if client.get_run(marker["run_id"]).info.status == "RUNNING":
            client.set_terminated(marker["run_id"], status="FAILED")
            client.set_tag(marker["run_id"], "spark_tuning.failure", "interrupted: driver or job killed")
    except Exception:  # noqa: BLE001 - an unreachable old store must not stop a new run
        pass


class RankZeroLogger:
    """What rank 0 would log, appended as JSON lines to `events_path` for the driver's `relay`; a no-op on
    every other rank, and where there is no run (events_path None)."""

    def __init__(self, events_path: Optional[str], enabled: bool):
        self.path = events_path if enabled else None

    def _write(self, event: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:  # one line per event, flushed as it closes
                f.write(json.dumps(event) + "\n")

    def metrics(self, values: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        if values:
            self._write({"metrics": values, "step": step})

    def params(self, values: dict[str, Any]) -> None:
        self._write({"params": values})

    def table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A small table (e.g. generated samples) as an MLflow table artifact, shown in the run's UI."""
        self._write({"table": columns, "artifact_file": artifact_file})


def log_event(ref: RunRef, event: dict) -> None:
    if "metrics" in event:
        log_metrics(ref, event["metrics"], event["step"])
    elif "params" in event:
        log_params(ref, event["params"])
    elif "table" in event:
        from mlflow import MlflowClient

        MlflowClient(ref.tracking_uri).log_table(ref.run_id, event["table"], event["artifact_file"])


# MLflow error codes of a value the store refused (the store itself answered): skip that event, go on.
REFUSED = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST")


@contextlib.contextmanager
def relay(ref: RunRef, events_path: str, every_s: float = 0.5, join_timeout_s: float = 30.0) -> Iterator[None]:
    """While the block runs, forward every complete line of `events_path` into the run; at the end, the
    rest. A line MLflow refuses (a bad value) is logged as a warning and skipped. A tracking store that
    does not answer stops the relay at its first failure, with a warning: training goes on, and the driver
    does not wait through MLflow's retries for every event (the events stay in the rank log). The thread
    is joined for at most `join_timeout_s` seconds."""
    stop = threading.Event()
    offset = 0  # bytes of the file already forwarded
    broken: list[str] = []  # the first failure of the store itself; nothing is sent after it

    def forward() -> None:
        nonlocal offset
        if broken:
            return
        try:
            with open(events_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return
        done = data.rfind(b"\n") + 1  # a line still being written waits for the next round
        offset += done
        for line in data[:done].splitlines():
            try:
                log_event(ref, json.loads(line))
            except Exception as e:  # noqa: BLE001 - a refused value, or the store down: see below
                if isinstance(e, (ValueError, TypeError)) or getattr(e, "error_code", "") in REFUSED:
                    logging.getLogger(__name__).warning("could not log a training event into MLflow: %s", e)
                    continue  # one bad line must not stop the others
                broken.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
                logging.getLogger(__name__).warning(
                    "the MLflow tracking store failed (%s): no more per-step metrics are sent to run %s; "
                    "training goes on", scrub(broken[0]), ref.run_id)
                return

    def loop() -> None:
        while not stop.wait(every_s):
            forward()

    thread = threading.Thread(target=loop, name="mlflow-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=join_timeout_s)
        if not thread.is_alive():
            forward()
