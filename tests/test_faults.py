"""Faults with real processes and real signals: a killed worker or driver fails the job fast, keeps the
last complete checkpoint, and a rerun resumes to the same model as an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import yaml

from spark_tuning.errors import InputError

from conftest import ROOT, make_reviews, tiny_job_config

CKPT_EVERY = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("fault-data") / "reviews.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in make_reviews(640, seed=3)))
    return str(p)


def config(tmp_path, data, model):
    return tiny_job_config(tmp_path, data, model, **{
        "train.epochs": 6, "checkpoint.every_steps": CKPT_EVERY, "checkpoint.keep_last": 2,
        "train.log_every_steps": 5})


@pytest.fixture(scope="module")
def reference(spark, tmp_path_factory, data, tiny_bert_dir):
    """The same job, never interrupted."""
    from spark_tuning import finetune

    cfg = config(tmp_path_factory.mktemp("reference"), data, tiny_bert_dir)
    return finetune.run(cfg, spark=spark)


def weights(folder: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_model(summary, reference):
    assert summary.metrics["accuracy"] == reference.metrics["accuracy"]
    assert summary.metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], abs=1e-5)
    a, b = weights(summary.output_dir), weights(reference.output_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def run_folder(out: str) -> str:
    from spark_tuning.paths import run_folder

    return run_folder(out)


def first_checkpoint(out: str, timeout: float = 600, at_least: int = 1) -> str:
    """The first complete checkpoint of step `at_least` or later in the run folder beside `out`."""
    root = os.path.join(run_folder(out), "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(root):
            done = [n for n in os.listdir(root) if n.startswith("step-")
                    and os.path.isfile(os.path.join(root, n, "COMPLETE")) and int(n.split("-")[1]) >= at_least]
            if done:
                return sorted(done)[0]
        time.sleep(0.05)
    raise TimeoutError("no checkpoint appeared")


def training_processes(root_pid: int, local_rank: str | None = None) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if "LOCAL_RANK" in env and (local_rank is None or env["LOCAL_RANK"] == local_rank):
            found.append(p)
    return found


def assert_resumable(out: str):
    run = run_folder(out)
    names = set(os.listdir(run))
    assert names == {"run.json", "checkpoints"}, names
    complete = [n for n in os.listdir(os.path.join(run, "checkpoints"))
                if os.path.isfile(os.path.join(run, "checkpoints", n, "COMPLETE"))]
    assert complete


@pytest.mark.slow
def test_killed_worker_fails_fast_and_resume_matches(spark, tmp_path, data, tiny_bert_dir, reference):
    from mlflow import MlflowClient

    from spark_tuning import finetune
    from spark_tuning.errors import JobFailed

    cfg = config(tmp_path, data, tiny_bert_dir)
    killed = {}

    def kill_rank_one():
        first_checkpoint(cfg.output_dir)
        victims = training_processes(os.getpid(), "1")
        killed["at"] = time.time()
        for v in victims:
            v.send_signal(signal.SIGKILL)
        killed["pids"] = [v.pid for v in victims]

    killer = threading.Thread(target=kill_rank_one, daemon=True)
    killer.start()
    with pytest.raises(JobFailed) as err:
        finetune.run(cfg, spark=spark)
    failed_after = time.time() - killed["at"]
    killer.join(5)
    assert killed["pids"], "no rank-1 process was found to kill"
    print(f"\nkilled worker -> job failed after {failed_after:.1f}s")
    message = str(err.value)
    # torchrun stops the other rank, or it notices the lost peer itself first (a race): either way the
    # report names the rank that died silently and shows its last log lines.
    assert "died without a word" in message and "rank 1" in message, message
    assert "last log lines of rank" in message, message
    assert failed_after < 60, failed_after

    assert_resumable(cfg.output_dir)
    assert not os.path.exists(cfg.output_dir)  # no half-written model: nothing is published before the end
    marker = json.load(open(os.path.join(run_folder(cfg.output_dir), "run.json")))
    client = MlflowClient(marker["tracking_uri"])
    assert client.get_run(marker["run_id"]).info.status == "FAILED"
    last_logged = max(m.step for m in client.get_metric_history(marker["run_id"], "train_loss"))

    resumed = finetune.run(cfg, spark=spark)  # same config: resumes by itself
    run = client.get_run(resumed.run_id)
    start = run.data.tags["spark_tuning.resumed_from"]
    resumed_step = int(os.path.basename(start).split("-")[1])
    print(f"resume started at step {resumed_step}; the killed run had logged up to step {last_logged} "
          f"(at most {last_logged - resumed_step + 5} steps redone)")
    assert resumed_step % CKPT_EVERY == 0 or resumed_step == reference.result["steps"]
    assert_same_model(resumed, reference)
    assert not os.path.exists(os.path.join(resumed.output_dir, "checkpoints"))
    assert not os.path.exists(run_folder(cfg.output_dir))  # the run's state goes once the model is published


def databricks_job_command(config_path: str, output_dir: str) -> list[str]:
    """The command conf/databricks/finetune_job.json runs (its task's python_file and parameters, the job
    parameters filled in), here."""
    with open(os.path.join(ROOT, "conf", "databricks", "finetune_job.json")) as f:
        job = json.load(f)
    [task] = job["tasks"]
    assert task["max_retries"] >= 1  # a failed run is retried with the very same command
    values = {"config": config_path, "output_dir": output_dir}
    args = [re.sub(r"\{\{job\.parameters\.(\w+)\}\}", lambda m: values[m.group(1)], a)
            for a in task["spark_python_task"]["parameters"]]
    script = task["spark_python_task"]["python_file"].split("/spark-tuning/", 1)[1]
    return [sys.executable, os.path.join(ROOT, script), *args]


@pytest.mark.slow
def test_the_scheduled_job_resumes_after_a_late_kill(spark, tmp_path, data, tiny_bert_dir, reference):
    """The Databricks job always passes --overwrite (last week's model is in output_dir) and is retried on
    failure with the same command. Its driver killed late in training: last week's model is untouched, the
    watchdog marks the run FAILED, and the retry resumes from the newest checkpoint (not from step 0), to
    the same model as an uninterrupted run, which then replaces last week's."""
    from mlflow import MlflowClient

    cfg = config(tmp_path, data, tiny_bert_dir)
    out = cfg.output_dir
    shutil.copytree(reference.output_dir, out)  # last week's finished model
    last_week = weights(out)
    conf = tmp_path / "job.yaml"
    conf.write_text("# the job's config\n" + yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "output_dir"}))
    command = databricks_job_command(str(conf), out)
    assert "--overwrite" in command
    late = reference.result["steps"] // 2
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        killed_at = int(first_checkpoint(out, at_least=late).split("-")[1])
        workers = training_processes(driver.pid)
        assert workers
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"training processes outlived the driver: {alive}"
    finally:
        if driver.poll() is None:
            driver.kill()
    assert_resumable(out)
    for name, value in weights(out).items():  # last week's model, untouched
        np.testing.assert_array_equal(value, last_week[name])
    marker = json.load(open(os.path.join(run_folder(out), "run.json")))
    client = MlflowClient(marker["tracking_uri"])
    deadline = time.time() + 60  # the watchdog notices the dead driver within seconds
    while client.get_run(marker["run_id"]).info.status == "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
    run = client.get_run(marker["run_id"])
    assert run.info.status == "FAILED", run.info.status
    assert "driver process died" in run.data.tags["spark_tuning.failure"]

    retry = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)  # the job's retry
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    new_run = json.load(open(os.path.join(out, ".spark-tuning.json")))["run_id"]
    start = client.get_run(new_run).data.tags["spark_tuning.resumed_from"]
    assert int(os.path.basename(start).split("-")[1]) >= killed_at  # not from step 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["accuracy"] == reference.metrics["accuracy"]
    assert metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], abs=1e-5)
    a, b = weights(out), weights(reference.output_dir)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    assert not os.path.exists(run_folder(out))
    print(f"\nkilled at step {killed_at} of {reference.result['steps']}; the retry resumed from {start}")


def test_resume_with_another_config_is_refused(tmp_path, data, tiny_bert_dir):
    from spark_tuning import finetune
    from spark_tuning.errors import InputError

    cfg = config(tmp_path, data, tiny_bert_dir)
    out = run_folder(cfg.output_dir)
    os.makedirs(os.path.join(out, "checkpoints", "step-00000010"))
    open(os.path.join(out, "checkpoints", "step-00000010", "COMPLETE"), "w").write("10")
    other = dict(cfg.to_dict())
    other["train"] = {**other["train"], "learning_rate": 1.0, "epochs": 99}
    json.dump({"config": other, "run_id": "x", "tracking_uri": "sqlite:///nowhere.db"},
              open(os.path.join(out, "run.json"), "w"))
    with pytest.raises(InputError) as err:
        finetune.plan_output(cfg, overwrite=False, resume=False)
    assert "train.epochs: 99 -> 6" in str(err.value) and "train.learning_rate: 1.0 ->" in str(err.value)
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-00000010"))  # nothing touched


def test_overwrite_continues_the_same_config_and_fresh_discards_it(tmp_path, data, tiny_bert_dir, caplog):
    """--overwrite is about the finished model (replaced at the end), not the interrupted run: the same
    config resumes with it; another config is discarded with a warning under it; --fresh always discards.
    An older version's layout (run.json and checkpoints inside output_dir) is moved beside it first."""
    import logging

    from spark_tuning import finetune

    cfg = config(tmp_path, data, tiny_bert_dir)
    out = cfg.output_dir
    os.makedirs(os.path.join(out, "checkpoints", "step-00000010"))  # the old layout, inside a finished model
    open(os.path.join(out, "checkpoints", "step-00000010", "COMPLETE"), "w").write("10")
    open(os.path.join(out, "model.safetensors"), "w").write("last week")
    json.dump({"written_by": "spark-tuning", "names": ["model.safetensors"]}, open(os.path.join(out, ".spark-tuning.json"), "w"))
    json.dump({"config": cfg.to_dict(), "run_id": "x", "tracking_uri": "sqlite:///nowhere.db"},
              open(os.path.join(out, "run.json"), "w"))
    plan = finetune.plan_output(cfg, overwrite=True, resume=False)
    assert plan.resume_from == os.path.join(run_folder(out), "checkpoints", "step-00000010") and not plan.clear_first
    assert sorted(os.listdir(out)) == [".spark-tuning.json", "model.safetensors"]  # the model alone, as published
    with pytest.raises(InputError, match="already holds a model: pass --overwrite"):
        finetune.plan_output(cfg, overwrite=False, resume=False)
    assert finetune.plan_output(cfg, overwrite=True, resume=False, fresh=True).clear_first
    other = config(tmp_path, data, tiny_bert_dir)
    other.train.learning_rate = 0.5
    with caplog.at_level(logging.WARNING):
        plan = finetune.plan_output(other, overwrite=True, resume=False)
    assert plan.clear_first and plan.resume_from is None
    assert "train.learning_rate" in caplog.text and "--overwrite discards it" in caplog.text
    assert os.path.isdir(os.path.join(run_folder(out), "checkpoints", "step-00000010"))  # removed only once it starts


def test_a_checkpoint_resumes_only_its_own_data_and_resume_insists(tmp_path, data, tiny_bert_dir):
    """The weekly table has new rows since the run was interrupted: its checkpoint is not continued on them
    (refused, or a fresh start under --overwrite). --resume fails where there is nothing to continue."""
    import numpy as np

    from spark_tuning import finetune

    seen = finetune.data_fingerprint(np.array([5, 9, 12]), 3, 1)
    assert finetune.data_fingerprint(np.array([12, 5, 9]), 3, 1) == seen  # another order, other shards: the same rows
    assert finetune.data_fingerprint(np.array([5, 9, 12, 7]), 4, 1) != seen
    plan = finetune.Plan(resume_from="/x/step-00000010", earlier_run={"data": seen})
    assert finetune.check_same_data(plan, seen, overwrite=False, out="/x") is plan
    other = finetune.data_fingerprint(np.array([5, 9, 13]), 3, 1)
    with pytest.raises(InputError, match="trained on other data"):
        finetune.check_same_data(plan, other, overwrite=False, out="/x")
    fresh = finetune.check_same_data(plan, other, overwrite=True, out="/x")
    assert fresh.resume_from is None and fresh.clear_first

    cfg = config(tmp_path, data, tiny_bert_dir)
    run = run_folder(cfg.output_dir)
    os.makedirs(os.path.join(run, "checkpoints", "step-00000010"))  # cut short: no COMPLETE marker
    json.dump({"config": cfg.to_dict(), "run_id": "x", "tracking_uri": "sqlite:///nowhere.db"},
              open(os.path.join(run, "run.json"), "w"))
    with pytest.raises(InputError, match="--resume: the interrupted run .* has no complete checkpoint"):
        finetune.plan_output(cfg, overwrite=False, resume=True)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    from spark_tuning.train import checkpoint

    root = tmp_path / "checkpoints"
    (root / "step-00000010").mkdir(parents=True)
    (root / "step-00000010" / "COMPLETE").write_text("10")
    (root / "step-00000020").mkdir()  # cut short: no marker
    (root / ".tmp-step-00000030-abc").mkdir()
    assert checkpoint.latest(str(root)).endswith("step-00000010")


def test_failure_report_waits_for_the_other_ranks_to_settle(tmp_path):
    """On a cluster the job fails while the other processes are still writing their last lines: until
    rank 0 writes its status, ranks 0 and 1 both look silent; the report waits for rank 1 to stand out."""
    from spark_tuning.cluster.faults import FAILED, describe_failure, log_path

    for rank in (0, 1):
        with open(log_path(str(tmp_path), rank), "w") as f:
            f.write(f"12:00:00 INFO spark_tuning.faults: rank {rank} started, pid {100 + rank}\n"
                    f"12:00:01 INFO spark_tuning.rank: rank {rank}: step 1/9, own loss 0.69\n")
    assert describe_failure(str(tmp_path)).startswith("training processes rank 0, rank 1 died without a word")

    def rank_zero_fails():
        time.sleep(1.0)
        with open(log_path(str(tmp_path), 0), "a") as f:
            f.write(f"12:00:03 ERROR spark_tuning.train: {FAILED}: Connection closed by peer\n")

    writer = threading.Thread(target=rank_zero_fails)
    writer.start()
    t0 = time.monotonic()
    report = describe_failure(str(tmp_path), settle_s=30)
    writer.join()
    assert time.monotonic() - t0 < 10  # it stops waiting as soon as one silent rank is left
    lines = report.splitlines()
    assert lines[0].startswith("training process rank 1 died without a word") and "rank 0: failed" in lines[0]
    assert lines[1:] == ["last log lines of rank 1:", "  12:00:00 INFO spark_tuning.faults: rank 1 started, pid 101",
                         "  12:00:01 INFO spark_tuning.rank: rank 1: step 1/9, own loss 0.69"]


@pytest.mark.parametrize("torchrun, body, code", [
    (True, "pass", 0),
    (True, "raise RuntimeError('writing the result failed')", 1),
    (False, "pass", 0),  # outside torchrun (a benchmark calling train_fn): the interpreter's own exit
])
def test_training_process_exit_skips_teardown_but_keeps_the_code(tmp_path, torchrun, body, code):
    """A training process ends with os._exit once its script is done (unloading torch costs seconds),
    after flushing its log; an uncaught exception still exits 1."""
    log_file = tmp_path / "rank.log"
    script = (
        "import atexit, logging, sys\n"
        "class Module:  # a module global's finaliser runs at interpreter teardown\n"
        f"    def __del__(self, open=open): open({str(tmp_path / 'teardown')!r}, 'w').close()\n"
        "kept = Module()\n"
        "from spark_tuning.cluster.faults import exit_without_teardown\n"
        "exit_without_teardown()\n"
        f"atexit.register(lambda: open({str(tmp_path / 'later-handler')!r}, 'w').close())\n"
        f"logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO)\n"
        "logging.getLogger('t').info('last words')\n"
        f"{body}\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    if torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    proc = subprocess.run([sys.executable, "-c", script], env=dict(env, PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert "last words" in log_file.read_text()
    # Handlers registered after it (torch's, transformers') still run before it ends the process.
    assert (tmp_path / "later-handler").exists()
    assert (tmp_path / "teardown").exists() is not torchrun
    if code == 1:
        assert "writing the result failed" in proc.stderr
