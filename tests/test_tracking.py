"""Rank 0's metrics reach the MLflow run through the driver: RankZeroLogger writes events, relay logs them
(a real SQLite-backed MLflow store; the "rank" is a child process, as in a job)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

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


class MlflowServer:
    """A real `mlflow server` (SQLite store, artifacts served by it) in its own process group."""

    def __init__(self, root, port: int):
        self.root, self.port, self.proc = root, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> "MlflowServer":
        import os
        import urllib.request

        os.makedirs(self.root, exist_ok=True)
        log = open(os.path.join(self.root, "server.log"), "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination", f"{self.root}/artifacts"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {open(os.path.join(self.root, 'server.log')).read()[-2000:]}")
                time.sleep(0.5)
        self.kill()
        raise TimeoutError("mlflow server did not answer")

    def kill(self) -> None:
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.mark.slow
def test_a_tracking_server_lost_after_training_keeps_the_model_and_log_model_logs_it(
        spark, tmp_path, reviews_jsonl, tiny_bert_dir, monkeypatch, capsys):
    """The server dies between training and logging: the job fails (exit 1) with the model published and a
    command to log it; once the server is back, `spark-tuning log-model` logs the metrics, the files and the
    registered model into the run and marks it FINISHED."""
    import glob
    import os
    import threading

    from mlflow import MlflowClient

    from conftest import tiny_job_config
    from spark_tuning import finetune
    from spark_tuning.cli import main
    from spark_tuning.deploy.serving import free_port
    from spark_tuning.errors import JobFailed
    from spark_tuning.paths import run_folder

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in seconds, not after MLflow's backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = MlflowServer(str(tmp_path / "store"), free_port())
    cfg = tiny_job_config(tmp_path, reviews_jsonl, tiny_bert_dir, **{
        "train.epochs": 2, "tracking.tracking_uri": server.url, "tracking.log_model": True,
        "deploy.registered_model_name": "lost-store"})
    out = cfg.output_dir

    def kill_once_trained():  # rank 0 has saved the trained model into the partial folder: training is over
        deadline = time.time() + 600
        while time.time() < deadline and not glob.glob(os.path.join(os.path.dirname(out), ".model.partial-*",
                                                                     "model.safetensors")):
            time.sleep(0.05)
        server.kill()

    try:
        server.start()
        killer = threading.Thread(target=kill_once_trained, daemon=True)
        killer.start()
        with pytest.raises(JobFailed) as err:
            finetune.run(cfg, spark=spark)
        killer.join(10)
        message = str(err.value)
        assert f"the trained model is saved in {out}" in message, message
        assert f"spark-tuning log-model --output-dir {out}" in message
        assert finetune.output_state(out) == "model" and os.path.isfile(os.path.join(out, "model.safetensors"))
        run_id = json.load(open(os.path.join(out, ".spark-tuning.json")))["run_id"]
        assert os.path.isdir(run_folder(out))  # kept: a retry of the job would resume from its final checkpoint

        server.start()  # the store answers again
        assert main(["log-model", "--output-dir", out]) == 0
        printed = capsys.readouterr().out
        assert f"into run {run_id}" in printed and "version 1" in printed, printed
        client = MlflowClient(server.url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["spark_tuning.logged_later"] == "true"
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        assert run.data.metrics["final_accuracy"] == metrics["accuracy"]
        assert "metrics.json" in [a.path for a in client.list_artifacts(run_id)]
        [version] = client.search_model_versions("name='lost-store'")
        assert version.run_id == run_id
        assert json.load(open(os.path.join(out, "mlflow_model.json")))["version"] == version.version
        assert finetune.output_state(out) == "model"  # the record it wrote is listed in the marker
        assert not os.path.exists(run_folder(out))
        assert main(["log-model", "--output-dir", out]) == 0  # once is enough: no second version
        assert "already logged" in capsys.readouterr().out
        assert len(client.search_model_versions("name='lost-store'")) == 1
    finally:
        server.kill()
