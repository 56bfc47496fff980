"""The job on a real Spark standalone cluster (a master and two 1-core workers on 127.0.0.1), submitted
with spark-submit.sh like a user would, against the same config in local mode.

Slow (3-5 minutes on 2 idle cores; much longer on a loaded machine, hence the generous timeouts): it starts a cluster and two spark-submit runs. `.ci/run` runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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


def _config(tmp, name: str, data: str, model: str, local_mode: bool) -> str:
    cfg = {
        "seed": 7,
        "output_dir": str(tmp / name / "model"),
        "data": {"source": data, "max_length": 64},
        "model": {"source": model},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0, "log_every_steps": 4},
        "distributed": {"num_processes": 2, "local_mode": local_mode, "use_gpu": False},
        "tracking": {"experiment": "cluster-tests", "log_model": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text("# ./spark-submit.sh this.yaml\n" + yaml.safe_dump(cfg))
    return str(path)


def _submit(config: str, master: str, extra: list[str], timeout_s: int = 900) -> tuple[str, float]:
    env = dict(os.environ, SPARK_TUNING_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    cmd = ["bash", os.path.join(ROOT, "spark-submit.sh"), config, "--master", master, "--",
           "--conf", "spark.ui.enabled=false", "--conf", "spark.driver.memory=1g",
           "--conf", "spark.sql.shuffle.partitions=2", *extra]
    t0 = time.perf_counter()
    # A session of its own: on a timeout the whole job (JVM, Python driver, training processes) is ended.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
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


def test_standalone_cluster_matches_local_mode(cluster, tmp_path, reviews_jsonl, tiny_bert_dir, record_property):
    local_cfg = _config(tmp_path, "local", reviews_jsonl, tiny_bert_dir, local_mode=True)
    cluster_cfg = _config(tmp_path, "cluster", reviews_jsonl, tiny_bert_dir, local_mode=False)

    out_local, wall_local = _submit(local_cfg, "local[2]", [])
    try:
        out_cluster, wall_cluster = _submit(cluster_cfg, cluster.url, [
            "--conf", "spark.executor.memory=1g", "--conf", "spark.executor.cores=1", "--conf", "spark.cores.max=2",
        ])
    except BaseException:
        print(cluster.logs())
        raise

    # The printed command: the package and the config travel to the cluster.
    assert f"--master {cluster.url}" in out_cluster
    assert "--py-files" in out_cluster and "--files" in out_cluster
    assert "--py-files" not in out_local
    # The training processes on the executors imported spark_tuning from the --py-files archive.
    assert "spark_tuning.zip/spark_tuning/train.py" in out_cluster + cluster.logs(tail=400)

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
