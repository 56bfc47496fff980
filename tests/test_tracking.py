"""Rank 0's metrics reach the MLflow run through the driver: RankZeroLogger writes events, relay logs them
(a real SQLite-backed MLflow store; the "rank" is a child process, as in a job)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from spark_tuning.track import tracking
from spark_tuning.track.tracking import RankZeroLogger, RunRef

RANK = """
import sys, time
from spark_tuning.track.tracking import RankZeroLogger
log = RankZeroLogger(sys.argv[1], enabled=True)
log.params({"mfu.peak_precision": "fp32"})
for step in range(1, 6):
    log.metrics({"train_loss": 1.0 / step, "note": "not a number"}, step)
    time.sleep(0.3)
log.table({"step": [5], "generated": ["positive"]}, "samples/step_000005.json")
print("mlflow" in sys.modules)
"""


def _run(tmp_path) -> RunRef:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("relay", artifact_location=f"file://{tmp_path / 'artifacts'}")
    return RunRef(uri, client.create_run(exp).info.run_id, exp)


def test_rank_zero_events_reach_the_run_while_it_trains(tmp_path):
    from mlflow import MlflowClient

    ref, events = _run(tmp_path), str(tmp_path / "events.jsonl")
    seen_during = []
    with tracking.relay(ref, events, every_s=0.1):
        rank = subprocess.Popen([sys.executable, "-c", RANK, events], stdout=subprocess.PIPE, text=True)
        while rank.poll() is None:  # the driver sees steps before training ends
            seen_during.append(len(MlflowClient(ref.tracking_uri).get_metric_history(ref.run_id, "train_loss")))
            time.sleep(0.1)
    assert rank.returncode == 0 and rank.stdout.read().strip() == "False"  # the rank never imported MLflow
    assert any(0 < n < 5 for n in seen_during), seen_during
    client = MlflowClient(ref.tracking_uri)
    history = sorted(client.get_metric_history(ref.run_id, "train_loss"), key=lambda m: m.step)
    assert [(m.step, round(m.value, 6)) for m in history] == [(s, round(1.0 / s, 6)) for s in range(1, 6)]
    assert "note" not in client.get_run(ref.run_id).data.metrics  # only numbers are metrics
    assert client.get_run(ref.run_id).data.params["mfu.peak_precision"] == "fp32"
    table = json.load(open(client.download_artifacts(ref.run_id, "samples/step_000005.json", str(tmp_path))))
    assert table["data"] == [[5, "positive"]]


def test_a_half_written_line_waits_and_a_bad_line_is_skipped(tmp_path, caplog):
    from mlflow import MlflowClient

    ref, events = _run(tmp_path), tmp_path / "events.jsonl"
    with tracking.relay(ref, str(events), every_s=0.05):
        events.write_text('{"metrics": {"a": 1.0}, "step": 1}\n{"metrics": {"a": 2')  # the rank is mid-line
        time.sleep(0.3)
        assert [m.value for m in MlflowClient(ref.tracking_uri).get_metric_history(ref.run_id, "a")] == [1.0]
        with open(events, "a") as f:
            f.write('.0}, "step": 2}\nnot json\n{"metrics": {"a": 3.0}, "step": 3}\n')
    values = sorted((m.step, m.value) for m in MlflowClient(ref.tracking_uri).get_metric_history(ref.run_id, "a"))
    assert values == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert "could not log a training event" in caplog.text


def test_other_ranks_and_runs_without_tracking_write_nothing(tmp_path):
    path = tmp_path / "events.jsonl"
    RankZeroLogger(str(path), enabled=False).metrics({"x": 1.0}, 1)
    RankZeroLogger(None, enabled=True).metrics({"x": 1.0}, 1)
    assert not path.exists()
