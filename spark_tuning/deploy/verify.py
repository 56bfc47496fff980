"""Check a served model against the run's offline numbers, and measure it.

`verify(url, data)` sends held-out rows through the endpoint in batches (in order, one request at a time,
so latencies are per request without queueing) and hands the answers to the run's task
(`Task.compare_served`), which says what must agree: for the tasks that answer labels
(evaluate/agreement.py), accuracy, precision, recall and F1 recomputed from the answers, and row by row the
same label, probabilities equal to `atol`. The tolerance follows the precisions of the two sides
(precision.probability_tolerance): 1e-5 when the run evaluated in fp32 on a CPU and the server does the
same (batches of different make-up move only the last float bits), up to 3e-2 where one side computes in
bf16; TF32 and fp16 sit between. A label that flips where the run's own top two probabilities were within
the tolerance of each other is a near tie that precision explains, counted but not a mismatch.
It also reports latency percentiles per request and rows per second.

Held-out data: a run's output folder (its eval_predictions.parquet and metrics.json), that Parquet file
itself, or any Parquet / JSON Lines / CSV file with a text column and (optionally) a label column.

The task is the run's (config.yaml in its folder); a data file of its own is compared as labels. An endpoint
whose first answer lacks the columns the task compares (a causal_lm / sft model that generates text has no
label_id and probabilities) is refused with a clear error. An sft model
trained on classification data answers labels too, and can be checked against a labelled data file (LM
runs write no offline predictions to compare with).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from spark_tuning.errors import InputError, JobFailed

PREDICTIONS = "eval_predictions.parquet"


@dataclass
class HeldOut:
    rows: pd.DataFrame  # text, and where known: label (id), prediction (id), probabilities
    names: Optional[list[str]]  # class names by id, when known
    offline_metrics: Optional[dict]  # the run's metrics.json
    task: Optional[str] = None  # the run's task (its config.yaml), None for a data file of its own


@dataclass
class Report:
    rows: int
    agreement: Optional[float]  # share of rows whose served label equals the offline one
    max_probability_diff: Optional[float]
    metrics: dict  # accuracy, precision, recall, f1 of the served answers (when labels are known)
    offline: dict  # the same, from the run
    differences: list[dict] = field(default_factory=list)  # row by row
    latency_ms: dict = field(default_factory=dict)  # p50, p95, p99, mean, max (per request)
    rows_per_second: float = 0.0
    requests: int = 0
    batch_size: int = 0
    seconds: float = 0.0
    tolerance: float = 1e-5  # the probability difference allowed per row
    tolerance_basis: str = ""  # why that tolerance: the precisions and devices of the run and the server
    near_ties: int = 0  # rows whose label flipped within the tolerance (precision, not a mismatch)
    metric_tolerance: float = 0.0  # numeric answers: metrics of values within the tolerance differ by this much

    @property
    def ok(self) -> bool:
        # Near ties may move the metrics by a row each; without them the metrics must be equal.
        slack = max((self.near_ties / max(1, self.rows)) * 2 + 1e-12, self.metric_tolerance)
        return not self.differences and all(
            abs(self.metrics[k] - self.offline[k]) < slack for k in self.offline if k in self.metrics)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("rows", "agreement", "max_probability_diff", "metrics", "offline",
                                              "differences", "latency_ms", "rows_per_second", "requests",
                                              "batch_size", "seconds", "tolerance", "tolerance_basis",
                                              "near_ties", "metric_tolerance")} | {"ok": self.ok}


def load_held_out(data: str, text_column: str = "text", label_column: str = "label") -> HeldOut:
    """Read held-out rows from a run folder, its eval_predictions.parquet, or a data file."""
    folder = data if os.path.isdir(data) and os.path.isfile(os.path.join(data, PREDICTIONS)) else None
    path = os.path.join(folder, PREDICTIONS) if folder else data
    if not os.path.exists(path):
        raise InputError(f"--data {data!r} does not exist: give a run's output folder or a Parquet/JSONL/CSV file")
    if os.path.isdir(path):
        raise InputError(f"--data {data!r} is a folder without {PREDICTIONS} (only classification runs write it): "
                         "give a classification run's output folder, or a Parquet/JSONL/CSV file with a text column")
    folder = folder or os.path.dirname(os.path.abspath(path))
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        rows = pd.read_json(path, lines=lower.endswith(".jsonl"))
    elif lower.endswith(".csv"):
        rows = pd.read_csv(path)
    else:
        rows = pd.read_parquet(path)
    if text_column not in rows.columns:
        raise InputError(f"{path} has no {text_column!r} column (columns: {list(rows.columns)}): "
                         "pass --text-column")
    rows = rows.rename(columns={text_column: "text"})
    if label_column != "label" and label_column in rows.columns:
        rows = rows.rename(columns={label_column: "label"})
    names, metrics = None, None
    label_map = os.path.join(folder, "label_map.json")
    if os.path.isfile(label_map):
        with open(label_map) as f:
            names = [v for _, v in sorted((int(k), v) for k, v in json.load(f)["id2label"].items())]
    metrics_path = os.path.join(folder, "metrics.json")
    if os.path.isfile(metrics_path) and {"prediction", "predicted"} & set(rows.columns):
        with open(metrics_path) as f:
            metrics = json.load(f)
    if "label" in rows.columns and rows["label"].dtype == object:
        if not names:
            raise InputError(f"{path}: the labels are names, and there is no label_map.json beside it to turn them "
                             "into the model's label ids: put the run's label_map.json there, or use label ids")
        index = {n: i for i, n in enumerate(names)}
        rows["label"] = rows["label"].map(index)
    return HeldOut(rows.reset_index(drop=True), names, metrics, _run_task(folder) if metrics else None)


def _run_task(folder: str) -> Optional[str]:
    import yaml

    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("task")


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    if len(ms) == 0:
        return {}
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "max": float(ms.max())}


def score_endpoint(url: str, texts: list[str], batch_size: int, timeout: float = 300.0,
                   pairs: Optional[list[str]] = None) -> tuple[pd.DataFrame, list[float]]:
    """Send `texts` (with their `pairs`, for a model trained on text pairs) in batches; returns the served
    predictions (in order) and each request's latency."""
    from spark_tuning.deploy.serving import post_json

    url = url.rstrip("/")
    url = url if url.endswith("/invocations") else url + "/invocations"
    parts, latencies = [], []
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        t = time.perf_counter()
        records = [{"text": x} for x in batch] if pairs is None else \
            [{"text": x, "text_pair": y} for x, y in zip(batch, pairs[start:start + batch_size])]
        status, body = post_json(url, {"dataframe_records": records}, timeout)
        latencies.append(time.perf_counter() - t)
        if status != 200:
            raise JobFailed(f"the endpoint {url} answered HTTP {status} for rows {start}-{start + len(batch) - 1}: "
                            f"{str(body)[:500]}")
        parts.append(pd.DataFrame(body["predictions"]))
    return pd.concat(parts, ignore_index=True), latencies


def tolerance_for(offline_metrics: Optional[dict], served: Optional[tuple[str, str]] = None) -> tuple[float, str]:
    """The probability tolerance for comparing a server with a run, and a line that says why. `served`:
    the server's (precision, device type); None: what a server on this machine would use."""
    from spark_tuning.train.precision import probability_tolerance
    from spark_tuning.deploy.serving_model import serving_placement

    m = offline_metrics or {}
    run = (m.get("train_precision", "fp32"), m.get("train_device", "cpu"))
    if served is None:
        device, precision = serving_placement(run[0])
        served = (precision, device.split(":")[0])
    tol = probability_tolerance(run, served)
    return tol, f"run evaluated in {run[0]} on {run[1]}, served in {served[0]} on {served[1]}"


def verify(url: str, data: str, batch_size: int = 32, atol: Optional[float] = None, text_column: str = "text",
           label_column: str = "label", served: Optional[tuple[str, str]] = None) -> Report:
    """`atol` None: the tolerance that follows the run's and the server's precisions (`tolerance_for`;
    `served` as there)."""
    from spark_tuning.deploy.serving import ping
    from spark_tuning.tasks import Task, get_task

    if not ping(url.rstrip("/").removesuffix("/invocations")):
        raise InputError(f"--endpoint {url} does not answer /ping: start it with `spark-tuning serve`")
    held = load_held_out(data, text_column, label_column)
    if atol is None:
        atol, basis = tolerance_for(held.offline_metrics, served)
    else:
        basis = "given (--atol)"
    texts = held.rows["text"].tolist()
    if not texts:
        raise InputError(f"--data {data!r} holds no rows to send")
    task = get_task(held.task) if held.task else Task()  # a data file of its own: compared as labels
    # One row first: it pays for lazy initialisation (kept out of the percentiles) and shows what is served.
    pairs = held.rows["text_pair"].tolist() if "text_pair" in held.rows.columns else None
    probe, _ = score_endpoint(url, texts[:1], 1, pairs=pairs)
    if not set(task.answer_columns) <= set(probe.columns):
        raise InputError(f"--endpoint {url} answers {sorted(map(str, probe.columns))}, not "
                         f"{' and '.join(task.answer_columns)}: it serves a text-generation model (causal_lm / sft), "
                         "and verify compares a run's labels and probabilities with the served ones; try a "
                         "generation model with a request of your own (README: Deploy and verify)")
    t = time.perf_counter()
    served, latencies = score_endpoint(url, texts, batch_size, pairs=pairs)
    seconds = time.perf_counter() - t
    if len(served) != len(texts):
        raise JobFailed(f"the endpoint returned {len(served)} predictions for {len(texts)} rows")
    a = task.compare_served(served, held, atol)
    return Report(rows=len(texts), agreement=a.agreement, max_probability_diff=a.max_probability_diff,
                  metrics=a.metrics, offline=a.offline, differences=a.differences, latency_ms=percentiles(latencies),
                  rows_per_second=len(texts) / seconds if seconds else 0.0, requests=len(latencies),
                  batch_size=batch_size, seconds=seconds, tolerance=atol, tolerance_basis=basis,
                  near_ties=a.near_ties, metric_tolerance=a.metric_tolerance)


def render(report: Report) -> str:
    lines = [f"rows {report.rows} in {report.requests} requests of up to {report.batch_size}: "
             f"{report.rows_per_second:.1f} rows/s"]
    if report.latency_ms:
        lat = report.latency_ms
        lines.append(f"latency per request: p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms")
    if report.agreement is not None:
        ties = f", {report.near_ties} near tie(s) within it" if report.near_ties else ""
        lines.append(f"agreement with the run's offline predictions: {100 * report.agreement:.2f}% "
                     f"(largest difference {report.max_probability_diff:.2e}; tolerance "
                     f"{report.tolerance:.0e}: {report.tolerance_basis}{ties})")
    for k, v in report.metrics.items():
        off = f"   offline {report.offline[k]:.4f}" if k in report.offline else ""
        lines.append(f"  {k:<9} served {v:.4f}{off}")
    for d in report.differences[:50]:
        what = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()
                         if k not in ("row", "row_id", "text"))
        lines.append(f"  DIFFERS row_id {d['row_id']}: {what} {d['text']!r}")
    if len(report.differences) > 50:
        lines.append(f"  ... and {len(report.differences) - 50} more")
    lines.append("VERIFIED: served predictions match the run" if report.ok else
                 "MISMATCH: the served model does not reproduce the run's predictions")
    return "\n".join(lines)
