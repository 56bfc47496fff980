"""Start the training processes with pyspark's TorchDistributor, after checking that they can start."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, TYPE_CHECKING

from spark_tuning.errors import InputError, JobFailed

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import Config, DistributedConfig


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def check_resources(cfg: DistributedConfig, spark=None) -> None:
    """Refuse settings that cannot run, before anything starts. Without `spark`, only what the driver
    machine can tell (local mode); with it, the cluster's task slots too."""
    n = cfg.num_processes
    if cfg.use_gpu:
        gpus = visible_gpus()
        if cfg.local_mode and gpus == 0:
            raise InputError(
                "distributed.use_gpu = true, but no GPU is visible here: set distributed.use_gpu: false "
                "(CPU processes with gloo) or run on a GPU machine"
            )
        if cfg.local_mode and n > gpus:
            raise InputError(
                f"distributed.num_processes = {n} is more than the {gpus} GPUs visible here: "
                f"set distributed.num_processes to at most {gpus}"
            )
    elif cfg.local_mode:
        cores = os.cpu_count() or 1
        if n > cores:
            raise InputError(
                f"distributed.num_processes = {n} is more than the {cores} CPU cores here: "
                f"set distributed.num_processes to at most {cores}"
            )
    if spark is not None and not cfg.local_mode:
        # One barrier task per process; on GPUs, one per `spark.task.resource.gpu.amount` processes.
        per_task = 1
        if cfg.use_gpu:
            per_task = gpus_per_task(spark.sparkContext.getConf().get(GPU_AMOUNT, "1")) or 1
        tasks = max(1, n // per_task)
        slots = task_slots(spark, wanted=tasks)
        if tasks > slots:
            raise InputError(
                f"distributed.num_processes = {n} needs {tasks} barrier tasks at once, but the cluster "
                f"({spark.sparkContext.master}) has only {slots} task slots: lower distributed.num_processes, add executors "
                "or cores (for a local master: local[N] with N >= num_processes), or use "
                "distributed.local_mode: true"
            )


# ----------------------------------------------------------------------------------------------------
# Cluster checks: what can be told from the SparkSession before anything is launched

# Paths that every node of a Databricks cluster sees (FUSE mounts of DBFS and Unity Catalog volumes).
SHARED_PREFIXES = ("/dbfs/", "/Volumes/")
# Filesystem types that are shared between machines (from /proc/mounts).
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "cephfs", "glusterfs",
                       "beegfs", "wekafs", "afs", "9p", "fuse", "efs"}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def master_hosts(master: str) -> list[str]:
    """Hosts named by a master URL: spark://h1:7077,h2:7077 -> [h1, h2]; k8s://https://h:443 -> [h]."""
    rest = master.split("://", 1)[-1]
    if rest.startswith(("https://", "http://")):
        rest = rest.split("://", 1)[1]
    hosts = []
    for part in rest.split("/")[0].split(","):
        host = part.rsplit(":", 1)[0] if part.count(":") == 1 or part.startswith("[") else part
        hosts.append(host)
    return hosts


def single_machine(master: str) -> bool:
    """True when every executor must run on this machine: a local master, or a standalone master that
    listens on the loopback interface only (workers elsewhere cannot reach it)."""
    if master.startswith("local"):
        return True
    return master.startswith("spark://") and all(h in LOOPBACK_HOSTS for h in master_hosts(master))


def filesystem_type(path: str) -> str:
    """The type of the filesystem that holds `path` (the longest mount point above it in /proc/mounts)."""
    path = os.path.realpath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


def is_shared_path(path: str) -> bool:
    """Whether a path can be seen from every node: DBFS / Unity Catalog volumes, or a network filesystem."""
    if path.startswith(("dbfs:/",)) or any(path.startswith(p) for p in SHARED_PREFIXES):
        return True
    kind = filesystem_type(path)
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse.")


def task_slots(spark, wanted: int = 0, wait_s: float = 30.0) -> int:
    """How many tasks the cluster can run at once (what a barrier stage needs). Executors of a
    standalone or YARN cluster register a few seconds after the session starts: wait up to `wait_s`
    for `wanted` slots before answering."""
    import time

    sc = spark.sparkContext
    task_cpus = max(1, int(sc.getConf().get("spark.task.cpus", "1")))
    master = sc.master
    if master.startswith("local"):
        return _local_cores(master) // task_cpus
    deadline = time.monotonic() + wait_s
    while True:
        try:
            jsc = sc._jsc.sc()
            slots = int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))
        except Exception:  # noqa: BLE001 - an internal API: fall back to what Spark reports publicly
            slots = sc.defaultParallelism // task_cpus
        if slots >= wanted or time.monotonic() > deadline:
            return slots
        time.sleep(1.0)


def _local_cores(master: str) -> int:
    import re

    cores = os.cpu_count() or 1
    if master == "local":
        return 1
    m = re.match(r"local-cluster\[(\d+),\s*(\d+),", master)
    if m:
        return int(m.group(1)) * int(m.group(2))
    m = re.match(r"local\[(\d+|\*)(?:,\s*\d+)?\]", master)
    if m:
        return cores if m.group(1) == "*" else int(m.group(1))
    return cores


def check_cluster(cfg: Config, spark) -> None:
    """Refuse, before any data is read, what cannot work on the session's master (see below)."""
    sc = spark.sparkContext
    check_shared_paths(cfg, sc.master)
    conf = sc.getConf()
    check_gpu_conf(cfg.distributed, lambda key: conf.get(key, None), sc.resources or {})


def check_shared_paths(cfg: Config, master: str) -> None:
    """Training on executors (local_mode: false) of a cluster needs the staged data and the output folder
    on storage that every node sees: rank 0 writes the model there, and every rank reads the data."""
    if cfg.distributed.local_mode or single_machine(master):
        return
    for key, path in (("loader.staging_dir", cfg.staging_root), ("output_dir", cfg.output_dir)):
        if not is_shared_path(path):
            raise InputError(
                f"{key} = {path!r} is on a disk of this machine only ({filesystem_type(path) or 'local'} "
                f"filesystem), but the training processes run on the executors of {master}, which cannot "
                f"see it: set {key} to storage every node sees (/dbfs/..., /Volumes/..., or an NFS mount), "
                "or use distributed.local_mode: true"
            )


GPU_AMOUNT = "spark.task.resource.gpu.amount"


def gpus_per_task(amount: Optional[str]) -> Optional[int]:
    """`spark.task.resource.gpu.amount` as the whole number of GPUs it must be; None when it is not one."""
    if amount is None:
        return None
    try:
        value = float(amount)
    except ValueError:
        return None
    return int(value) if value == int(value) else None


def pyspark_major() -> int:
    import pyspark

    return int(pyspark.__version__.split(".")[0])


def check_gpu_conf(d: DistributedConfig, conf_get: Callable[[str], Optional[str]], resources: dict,
                   spark_major: Optional[int] = None) -> None:
    """- GPUs on executors need `spark.task.resource.gpu.amount`, a whole number of GPUs per task (one
      training process per GPU; TorchDistributor reads it with int() and fails on "0.5");
    - pyspark before 4.0 starts one process per task whatever GPUs the task owns, so more than one GPU per
      task leaves the rendezvous waiting for processes that never come;
    - GPUs in local mode, where Spark assigns GPUs to the driver, need at least one per process
      (TorchDistributor would otherwise quietly start fewer processes)."""
    if not d.use_gpu:
        return
    if not d.local_mode:
        key = GPU_AMOUNT
        amount = conf_get(key)
        value = gpus_per_task(amount)
        if amount is None or (value is not None and value <= 0):
            raise InputError(
                f"distributed.use_gpu = true with distributed.local_mode = false, but {key} is "
                f"{'not set' if amount is None else repr(amount)}, so Spark gives the training tasks no GPU: set "
                f"{key}: \"1\" under spark.conf in the config (or --conf {key}=1, or in the cluster's Spark "
                "config), with spark.executor.resource.gpu.amount set to the GPUs per worker"
            )
        if value is None:
            raise InputError(
                f"{key} = {amount!r} is not a whole number of GPUs: each training process needs a GPU of its own "
                f"(TorchDistributor does not share GPUs between tasks): set {key}: \"1\" (one process per GPU)")
        major = pyspark_major() if spark_major is None else spark_major
        if value > 1 and major < 4:
            raise InputError(
                f"{key} = {amount!r}: pyspark {major}.x starts one training process per task whatever GPUs the task "
                f"owns, so with {value} GPUs per task the processes wait for peers that never start: set {key}: "
                "\"1\" (one task, and one process, per GPU), or use a runtime with pyspark 4")
        if value > 1 and d.num_processes % value:
            raise InputError(
                f"distributed.num_processes = {d.num_processes} must be a multiple of {key} = {amount}"
            )
    elif "gpu" in resources:
        owned = len(resources["gpu"].addresses)
        if d.num_processes > owned:
            raise InputError(
                f"distributed.num_processes = {d.num_processes}, but Spark gives the driver only {owned} GPU(s) "
                "(spark.driver.resource.gpu.amount): raise spark.driver.resource.gpu.amount or lower "
                "distributed.num_processes"
            )


# ----------------------------------------------------------------------------------------------------
# Launch


SETTLE_S = 20.0  # how long a failed cluster training may take to tell which process died


def run_distributed(train_fn: Callable[[dict], Any], payload: dict, cfg: DistributedConfig) -> Optional[Any]:
    """TorchDistributor(...).run(train_fn, payload): DDP over gloo (CPU) or NCCL (GPU).
    payload["log_dir"], when set, is where each rank writes its own log (see faults.py)."""
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    tell_gpus = cfg.use_gpu
    if spark is not None:
        if not cfg.local_mode:
            _ship_py_files(spark)
        elif cfg.use_gpu and "gpu" not in (spark.sparkContext.resources or {}):
            # TorchDistributor's local GPU mode insists on GPUs assigned to the driver by Spark
            # (spark.driver.resource.gpu.*). Without them, torchrun's processes see the GPUs that are
            # visible here (CUDA_VISIBLE_DEVICES) and each takes cuda:<local rank>: the same placement.
            tell_gpus = False
    distributor = TorchDistributor(num_processes=cfg.num_processes, local_mode=cfg.local_mode, use_gpu=tell_gpus)
    try:
        # On executors (local_mode: false) training is one barrier stage whose result is collected: when a
        # task fails, Spark aborts the job ("Could not recover from a failed barrier ResultStage") and
        # kills the other tasks, whatever spark.task.maxFailures says: training is never restarted from
        # scratch behind the user's back (tests/test_cluster.py checks it). Nothing to configure.
        return distributor.run(train_fn, payload)
    except Exception as e:  # noqa: BLE001
        from spark_tuning.cluster.faults import describe_failure

        # In local mode torchrun has ended every process before run() returns; on executors the other
        # processes may still be writing their last lines (faults.describe_failure).
        settle_s = 0.0 if cfg.local_mode else SETTLE_S
        report = describe_failure(payload.get("log_dir"), settle_s) or _summarise(e)
        lost = _executor_lost(e)
        raise JobFailed(f"training failed: {report}" + (f"\nSpark: {lost}" if lost else "")) from e


def _executor_lost(e: Exception) -> Optional[str]:
    """Spark's own line when an executor died under a training task ("ExecutorLostFailure (executor 0
    exited ...) Reason: Command exited with code 137"): the rank logs cannot tell that the process went
    down with its executor."""
    for line in str(e).splitlines():
        if "ExecutorLostFailure" in line:
            return line.strip()
    return None


def _summarise(e: Exception) -> str:
    """The end of TorchDistributor's own error, for when no rank left a log (see faults.py)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return "\n".join(lines[-40:]) if len(lines) > 1 else str(e)


def _ship_py_files(spark) -> None:
    """Make the --py-files archives importable by the training processes too.

    Spark puts --py-files on `sys.path` of its Python workers only; TorchDistributor's torchrun starts new
    processes that unpickle `train_fn` by reference and so must import spark_tuning themselves. The
    archives lie in the executor's working folder, which those processes inherit: put their names on
    PYTHONPATH for the executors' Python workers, whose environment torchrun passes on."""
    sc = spark.sparkContext
    names = [n for n in getattr(sc, "_python_includes", None) or [] if n]
    if not names:
        return
    current = sc.environment.get("PYTHONPATH", "")
    parts = [p for p in current.split(os.pathsep) if p]
    sc.environment["PYTHONPATH"] = os.pathsep.join([*[n for n in names if n not in parts], *parts])
