"""The job on a real Spark standalone cluster (a master and two 1-core workers on 127.0.0.1), submitted
with spark-submit.sh like a user would: against the same config in local mode, and with a training process
killed on an executor.

Slow (about 5 minutes on an idle 2-core machine, 12 at load 7; hence the generous timeouts): it starts one
cluster for the module, one local run in process and two spark-submit runs (three with
SPARK_TUNING_TEST_EXECUTOR_KILL=1).
`.ci/run` runs it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import yaml

from standalone import StandaloneCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# Both runs use 1 thread per training process, gloo, the same seed and the same staged files: the
# results agree to float rounding (summation order inside all-reduce and kernels). Measured agreement
# was far tighter than these bounds; they leave room for another CPU's kernels.
LOSS_TOL = 1e-3


@pytest.fixture(scope="module")
def cluster():
    # The cluster must not see this checkout on PYTHONPATH: executors have to get the package from
    # --py-files, as on a real cluster.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    c = StandaloneCluster(workers=2, cores=1, memory="2g", env=env).start()
    try:
        yield c
    finally:
        c.stop()


def _config(tmp, name: str, data: str, model: str, local_mode: bool, **train) -> str:
    cfg = {
        "seed": 7,
        "output_dir": str(tmp / name / "model"),
        "data": {"source": data, "max_length": 64},
        "model": {"source": model},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0, "log_every_steps": 4,
                  **train},
        "distributed": {"num_processes": 2, "local_mode": local_mode, "use_gpu": False},
        "tracking": {"experiment": "cluster-tests", "log_model": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text("# ./spark-submit.sh this.yaml\n" + yaml.safe_dump(cfg))
    return str(path)


# What the cluster runs use beyond the defaults: two 1-core executors, one per worker. Their JVMs live for
# one short job beside five others on this 2-core machine: the first JIT tier alone saves ~15 s a job here.
CLUSTER_CONF = ["--conf", "spark.executor.memory=1g", "--conf", "spark.executor.cores=1", "--conf", "spark.cores.max=2",
                "--conf", "spark.executor.extraJavaOptions=-XX:TieredStopAtLevel=1"]


def _start(config: str, master: str, extra: list[str], stdout=subprocess.PIPE) -> subprocess.Popen:
    env = dict(os.environ, SPARK_TUNING_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    cmd = ["bash", os.path.join(ROOT, "spark-submit.sh"), config, "--master", master, "--",
           "--conf", "spark.ui.enabled=false", "--conf", "spark.driver.memory=1g",
           "--conf", "spark.sql.shuffle.partitions=2", *extra]
    # A session of its own: on a timeout the whole job (JVM, Python driver, training processes) is ended.
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _submit(config: str, master: str, extra: list[str], timeout_s: int = 900) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = _start(config, master, extra)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"spark-submit.sh ran past {timeout_s}s:\n{output[-6000:]}")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        pytest.fail(f"spark-submit.sh exited {proc.returncode} after {wall:.0f}s:\n{output[-6000:]}")
    return output, wall


def _mlflow_history(output_dir: str, key: str) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient("sqlite:///" + os.path.join(os.path.dirname(output_dir), "mlflow.db"))
    exp = client.get_experiment_by_name("cluster-tests")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_standalone_cluster_matches_local_mode(cluster, spark, tmp_path, reviews_jsonl, tiny_bert_dir,
                                              record_property):
    """The same config in local mode (in this process, on the tests' local[2] session: spark-submit.sh in
    local mode is test_quickstart's) and submitted to the cluster: the same training to float rounding."""
    from spark_tuning import finetune
    from spark_tuning.config import load_config

    local_cfg = _config(tmp_path, "local", reviews_jsonl, tiny_bert_dir, local_mode=True)
    cluster_cfg = _config(tmp_path, "cluster", reviews_jsonl, tiny_bert_dir, local_mode=False)

    t0 = time.perf_counter()
    finetune.run(load_config(local_cfg), spark=spark)
    wall_local = time.perf_counter() - t0
    try:
        out_cluster, wall_cluster = _submit(cluster_cfg, cluster.url, CLUSTER_CONF)
    except BaseException:
        print(cluster.logs())
        raise

    # The printed command: the package and the config travel to the cluster.
    assert f"--master {cluster.url}" in out_cluster
    assert "--py-files" in out_cluster and "--files" in out_cluster
    # The training processes on the executors imported spark_tuning from the --py-files archive.
    assert "spark_tuning.zip/spark_tuning/train/loop.py" in out_cluster + cluster.logs(tail=400)

    local = json.load(open(tmp_path / "local" / "model" / "metrics.json"))
    remote = json.load(open(tmp_path / "cluster" / "model" / "metrics.json"))
    assert os.path.isfile(tmp_path / "cluster" / "model" / "model.safetensors")
    assert remote["train_steps"] == local["train_steps"] > 0
    assert remote["num_examples"] == local["num_examples"] == 32
    assert remote["confusion_matrix"] == local["confusion_matrix"]
    for a, b in zip(local["epochs"], remote["epochs"]):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=LOSS_TOL)
        assert b["eval_accuracy"] == pytest.approx(a["eval_accuracy"], abs=1e-9)
    train_local = _mlflow_history(str(tmp_path / "local" / "model"), "train_loss")
    train_cluster = _mlflow_history(str(tmp_path / "cluster" / "model"), "train_loss")
    assert len(train_local) == len(train_cluster) >= 4
    assert train_cluster == pytest.approx(train_local, abs=LOSS_TOL)

    figures = {
        "local_wall_s": round(wall_local, 1), "cluster_wall_s": round(wall_cluster, 1),
        "local_tokens_per_s": round(local["train_tokens_per_second"]),
        "cluster_tokens_per_s": round(remote["train_tokens_per_second"]),
        "max_train_loss_diff": max(abs(a - b) for a, b in zip(train_local, train_cluster)),
        "max_eval_loss_diff": max(abs(a["eval_loss"] - b["eval_loss"]) for a, b in zip(local["epochs"], remote["epochs"])),
    }
    for k, v in figures.items():
        record_property(k, v)
    print("\nlocal mode vs standalone cluster:", json.dumps(figures))


# Set on the executors (spark.executorEnv) and so inherited by everything they start: Python workers,
# torchrun, the training processes. Finds the job's processes wherever they were re-parented.
JOB_MARKER = "SPARK_TUNING_TEST_JOB"


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(JOB_MARKER) == marker:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


# Each case is one more cluster job (about 4 minutes with 2 cores at load 7). Killing the executor JVM adds
# Spark's ExecutorLostFailure line to the report; it runs when SPARK_TUNING_TEST_EXECUTOR_KILL=1.
EXECUTOR_KILL = pytest.mark.skipif(os.environ.get("SPARK_TUNING_TEST_EXECUTOR_KILL") != "1",
                                   reason="one more cluster job: set SPARK_TUNING_TEST_EXECUTOR_KILL=1 to run it")


@pytest.mark.parametrize("victim_kind", ["training process", pytest.param("executor", marks=EXECUTOR_KILL)])
def test_dead_worker_fails_the_cluster_job(cluster, tmp_path, reviews_jsonl, tiny_bert_dir, record_property,
                                           victim_kind):
    """Mid-training, rank 1's training process dies (SIGKILL, as from the out-of-memory killer), or the
    executor JVM that hosts it does: the job exits non-zero within a minute, names rank 1 and shows its
    last log lines, leaves no process behind, and its MLflow run is FAILED. Spark does not rerun the
    barrier stage: each rank started once."""
    from mlflow import MlflowClient

    marker = uuid.uuid4().hex
    # Long enough (~400 steps) that training still runs when the kill comes, after its first step.
    config = _config(tmp_path, "killed", reviews_jsonl, tiny_bert_dir, local_mode=False, epochs=40,
                     log_every_steps=1)
    out_path = tmp_path / "killed.out"
    rank_logs: dict[str, str] = {}  # the rank logs as last read: the job removes its staging folder on exit
    victim, killed_at, ended_at = None, None, None
    with open(out_path, "w") as out:
        proc = _start(config, cluster.url, [*CLUSTER_CONF, "--conf", f"spark.executorEnv.{JOB_MARKER}={marker}"],
                      stdout=out)
    try:
        deadline = time.monotonic() + 900
        while proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the job ran past 900s:\n{out_path.read_text()[-6000:]}\n{cluster.logs()}")
            # The job's staging folder is a hidden one: <output root>/.staging/.run.data-*/
            for path in glob.glob(str(tmp_path / "killed" / ".staging" / ".*" / "logs" / "rank-*.log")):
                try:
                    rank_logs[os.path.basename(path)] = open(path, errors="replace").read()
                except OSError:
                    pass
            # Training is under way once both ranks have logged a step (rank 0 can log step 1 before rank 1
            # does; the test then expects rank 1's step line among its last words): kill rank 1, found by
            # the pid its log names.
            if victim is None and all(re.search(r"step \d+/\d+", rank_logs.get(f"rank-{r}.log", ""))
                                      for r in (0, 1)):
                pid = int(re.search(r"rank 1 started, pid (\d+)", rank_logs["rank-1.log"]).group(1))
                victim = psutil.Process(pid)
                env = victim.environ()
                assert env.get(JOB_MARKER) == marker and env.get("RANK") == "1", (victim, env.get("RANK"))
                if victim_kind == "executor":
                    victim = next(p for p in victim.parents()
                                  if any(a.endswith("CoarseGrainedExecutorBackend") for a in p.cmdline()))
                victim.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
            time.sleep(0.1)
        ended_at = time.monotonic()
        output = out_path.read_text()
        assert victim is not None, f"the job ended before training started:\n{output[-6000:]}"
        failed_after = ended_at - killed_at
        print(f"\nkilled rank 1's {victim_kind} -> the job exited {proc.returncode} after {failed_after:.1f}s")
        record_property("kill_to_exit_s", round(failed_after, 1))

        assert proc.returncode == 1, output[-6000:]  # JobFailed
        assert failed_after < 60, failed_after
        report = output[output.index("spark-tuning: error:"):]
        assert "training process rank 1 died without a word" in report, report
        # The lines rank 1 wrote before it died (its own progress), as the job's error shows them.
        last = rank_logs["rank-1.log"].splitlines()[-1]
        assert re.search(r"rank 1: step \d+/\d+, own loss", last), last
        assert "last log lines of rank 1:\n" in report and f"  {last}" in report, report
        if victim_kind == "executor":  # and Spark's word on the executor the process died with
            assert re.search(r"\nSpark: ExecutorLostFailure \(executor \d+ exited", report), report
        # Spark aborts a failed barrier result stage instead of retrying it: no rank started twice.
        for name, text in rank_logs.items():
            assert len(re.findall(r"rank \d+ started, pid", text)) == 1, (name, text)

        # No process of the job is left: not the executors, nor anything they started (torchrun, ranks).
        deadline = time.monotonic() + 30
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [(p.pid, " ".join(p.cmdline()[:4])) for p in _marked(marker)]
        assert not left, f"processes of the failed job still run: {left}"

        client = MlflowClient("sqlite:///" + str(tmp_path / "killed" / "mlflow.db"))
        (run,) = client.search_runs([client.get_experiment_by_name("cluster-tests").experiment_id])
        assert run.info.status == "FAILED"
    except BaseException:
        print(cluster.logs(tail=80))
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in _marked(marker):  # only this test's processes carry its marker
            try:
                p.kill()
            except psutil.Error:
                pass
