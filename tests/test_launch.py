"""Checks that refuse impossible distributed settings before anything is launched, and the pieces that
make a job run the same on a cluster as locally."""

from __future__ import annotations

import os
import zipfile

import pandas as pd
import pytest

from spark_tuning.config import Config, DistributedConfig, load_config
from spark_tuning.errors import InputError
from spark_tuning.cluster import launch


def test_local_core_counts_from_master_urls():
    assert launch._local_cores("local") == 1
    assert launch._local_cores("local[3]") == 3
    assert launch._local_cores("local[4, 2]") == 4
    assert launch._local_cores("local[*]") == (os.cpu_count() or 1)
    assert launch._local_cores("local-cluster[2,1,1024]") == 2
    assert launch._local_cores("local-cluster[3, 2, 1024]") == 6


def test_single_machine_masters():
    assert launch.single_machine("local[2]")
    assert launch.single_machine("spark://127.0.0.1:7077")
    assert launch.single_machine("spark://localhost:7077,127.0.0.1:7078")
    assert not launch.single_machine("spark://10.1.2.3:7077")
    assert not launch.single_machine("spark://127.0.0.1:7077,10.1.2.3:7077")
    assert not launch.single_machine("yarn")
    assert not launch.single_machine("k8s://https://127.0.0.1:6443")  # pods are other machines
    assert launch.master_hosts("k8s://https://api.example:6443") == ["api.example"]


def test_too_many_processes_for_a_local_master_is_refused(spark):
    """local_mode: false on local[2] runs barrier tasks in the driver's executor: 2 slots."""
    with pytest.raises(InputError, match=r"distributed.num_processes = 3 needs 3 barrier tasks.*only 2 task slots"):
        launch.check_resources(DistributedConfig(num_processes=3, local_mode=False), spark)
    launch.check_resources(DistributedConfig(num_processes=2, local_mode=False), spark)


def test_use_gpu_without_a_visible_gpu_is_refused():
    if launch.visible_gpus():
        pytest.skip("a GPU is visible here")
    with pytest.raises(InputError, match="distributed.use_gpu = true, but no GPU is visible"):
        launch.check_resources(DistributedConfig(num_processes=1, local_mode=True, use_gpu=True))


def test_use_gpu_on_executors_needs_the_task_gpu_amount(spark):
    d = DistributedConfig(num_processes=2, local_mode=False, use_gpu=True)
    with pytest.raises(InputError, match=r"spark.task.resource.gpu.amount is not set"):
        launch.check_cluster(Config(distributed=d), spark)  # the test session sets no GPU resources
    with pytest.raises(InputError, match=r"spark.task.resource.gpu.amount is '0'"):
        launch.check_gpu_conf(d, {"spark.task.resource.gpu.amount": "0"}.get, {})
    with pytest.raises(InputError, match="multiple of spark.task.resource.gpu.amount"):
        launch.check_gpu_conf(DistributedConfig(num_processes=3, local_mode=False, use_gpu=True),
                              {"spark.task.resource.gpu.amount": "2"}.get, {}, spark_major=4)
    launch.check_gpu_conf(d, {"spark.task.resource.gpu.amount": "1"}.get, {})
    launch.check_gpu_conf(d, {"spark.task.resource.gpu.amount": "2"}.get, {}, spark_major=4)


@pytest.mark.parametrize("amount", ["0.5", "1.5", "one"])
def test_a_fraction_of_a_gpu_per_task_is_refused_before_torchdistributor_sees_it(amount):
    """TorchDistributor reads the amount with int(): "0.5" passed float() here and then failed inside it
    with a bare ValueError, after the data stage."""
    d = DistributedConfig(num_processes=2, local_mode=False, use_gpu=True)
    with pytest.raises(InputError, match=rf"spark.task.resource.gpu.amount = '{amount}' is not a whole number.*set "
                                         r"spark.task.resource.gpu.amount: \"1\""):
        launch.check_gpu_conf(d, {"spark.task.resource.gpu.amount": amount}.get, {})
    assert launch.gpus_per_task("2.0") == 2 and launch.gpus_per_task("0.5") is None


def test_several_gpus_per_task_need_pyspark_4():
    """pyspark 3.5 (Databricks Runtime 15.4) starts one process per task: 2 GPUs per task would leave the
    rendezvous waiting for processes that never start."""
    d = DistributedConfig(num_processes=4, local_mode=False, use_gpu=True)
    with pytest.raises(InputError, match=r"pyspark 3.x starts one training process per task"):
        launch.check_gpu_conf(d, {"spark.task.resource.gpu.amount": "2"}.get, {}, spark_major=3)
    launch.check_gpu_conf(d, {"spark.task.resource.gpu.amount": "1"}.get, {}, spark_major=3)


def test_driver_gpus_fewer_than_processes_is_refused():
    class Gpus:
        addresses = ["0"]

    d = DistributedConfig(num_processes=2, local_mode=True, use_gpu=True)
    with pytest.raises(InputError, match="spark.driver.resource.gpu.amount"):
        launch.check_gpu_conf(d, {}.get, {"gpu": Gpus()})
    launch.check_gpu_conf(d, {}.get, {})  # no Spark-assigned GPUs: the visible ones are used


def test_node_local_staging_with_a_cluster_master_is_refused(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}/out/model", "distributed.local_mode=false"])
    if launch.is_shared_path(str(tmp_path)):
        pytest.skip(f"{tmp_path} is on a shared filesystem here")
    with pytest.raises(InputError, match=r"loader.staging_dir = .* on a disk of this machine only"):
        launch.check_shared_paths(cfg, "spark://10.1.2.3:7077")
    # The staging folder on shared storage, the output still local: the output is named next.
    cfg.loader.staging_dir = "/dbfs/tmp/staging"
    with pytest.raises(InputError, match=r"output_dir = .* set output_dir"):
        launch.check_shared_paths(cfg, "spark://10.1.2.3:7077")
    # Every executor of a loopback master is on this machine; local mode trains on the driver.
    launch.check_shared_paths(cfg, "spark://127.0.0.1:7077")
    cfg.distributed.local_mode = True
    launch.check_shared_paths(cfg, "yarn")


def test_shared_paths():
    assert launch.is_shared_path("/dbfs/team/staging")
    assert launch.is_shared_path("/Volumes/main/default/vol/staging")
    assert launch.filesystem_type("/") != ""


def test_threads_follow_omp_num_threads(monkeypatch):
    from spark_tuning.train import distributed

    ctx = distributed.Context(rank=0, local_rank=0, world_size=2, local_world_size=1, device="cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert distributed.threads_per_process(ctx) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert distributed.threads_per_process(ctx) == max(1, os.cpu_count() or 1)


def test_py_files_reach_the_training_processes(spark, tmp_path):
    """--py-files archives are put on PYTHONPATH for the executors' Python workers (torchrun inherits it)."""
    sc = spark.sparkContext
    before_env, before_includes = dict(sc.environment), list(sc._python_includes)
    try:
        sc._python_includes.append("pkg.zip")
        sc.environment["PYTHONPATH"] = "other"
        launch._ship_py_files(spark)
        assert sc.environment["PYTHONPATH"].split(os.pathsep) == ["pkg.zip", "other"]
        launch._ship_py_files(spark)  # idempotent
        assert sc.environment["PYTHONPATH"].split(os.pathsep) == ["pkg.zip", "other"]
    finally:
        sc.environment.clear()
        sc.environment.update(before_env)
        sc._python_includes[:] = before_includes


def test_staging_does_not_depend_on_input_partitioning(spark, tmp_path):
    """local[*] and a cluster partition the input differently: the staged files must not differ, or the
    ranks would get other rows in another order."""
    import pyarrow.parquet as pq

    from spark_tuning.loader.staging import _files, stage

    rows = [(i % 2, [101, 1000 + i, *range(i % 17 + 1), 102], i % 17 + 4) for i in range(300)]  # all distinct
    df = spark.createDataFrame(rows, "label int, input_ids array<int>, length int")
    contents = []
    for n, parts in enumerate((1, 3, 7)):
        ref = stage(df.repartition(parts), str(tmp_path / f"staged-{n}"), 4)
        assert ref.num_rows == 300
        files = _files(ref.path)
        contents.append([pq.read_table(f).to_pylist() for f in files])
    assert contents[0] == contents[1] == contents[2]
    sizes = [len(rows) for rows in contents[0]]
    assert len(sizes) == 4 and min(sizes) > 40, sizes  # hashing spreads rows over the files
