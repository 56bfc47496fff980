"""The Databricks job definitions are valid: the fields and types the Jobs API 2.1 expects, the same job
in the bundle as in the JSON, paths that exist in the repository, and a config the job's checks accept."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from spark_tuning.cluster import launch
from spark_tuning.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DBX = os.path.join(ROOT, "conf", "databricks")
WORKSPACE_ROOT = "/Workspace/Shared/spark-tuning/"  # where README.md says to upload the repository's files

# Jobs API 2.1 (POST /api/2.1/jobs/create): the fields this job uses and their types.
JOB_FIELDS = {"name": str, "description": str, "tags": dict, "max_concurrent_runs": int, "timeout_seconds": int,
              "schedule": dict, "email_notifications": dict, "parameters": list, "job_clusters": list, "tasks": list}
TASK_FIELDS = {"task_key": str, "description": str, "job_cluster_key": str, "spark_python_task": dict,
               "libraries": list, "max_retries": int, "min_retry_interval_millis": int, "retry_on_timeout": bool,
               "timeout_seconds": int}
CLUSTER_FIELDS = {"spark_version": str, "node_type_id": str, "driver_node_type_id": str, "num_workers": int,
                  "data_security_mode": str, "spark_conf": dict, "spark_env_vars": dict}
GPUS_PER_NODE = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g4dn.xlarge": 1, "p3.2xlarge": 1,
                 "g5.12xlarge": 4, "p4d.24xlarge": 8, "Standard_NC6s_v3": 1, "Standard_NV36ads_A10_v5": 1,
                 "g2-standard-8": 1}


@pytest.fixture(scope="module")
def job():
    with open(os.path.join(DBX, "finetune_job.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def bundle():
    with open(os.path.join(DBX, "databricks.yml")) as f:
        return yaml.safe_load(f)


def check_types(obj: dict, fields: dict, where: str) -> None:
    unknown = set(obj) - set(fields)
    assert not unknown, f"{where}: fields the Jobs API does not know here: {unknown}"
    for key, value in obj.items():
        assert isinstance(value, fields[key]) and not (fields[key] is int and isinstance(value, bool)), \
            f"{where}.{key} = {value!r} should be {fields[key].__name__}"


def test_job_json_has_the_fields_and_types_the_jobs_api_expects(job):
    check_types(job, JOB_FIELDS, "job")
    assert job["name"].strip() and job["max_concurrent_runs"] >= 1
    sched = job["schedule"]
    assert set(sched) == {"quartz_cron_expression", "timezone_id", "pause_status"}
    assert len(sched["quartz_cron_expression"].split()) in (6, 7)  # Quartz: seconds first
    assert sched["pause_status"] in ("PAUSED", "UNPAUSED")
    for p in job["parameters"]:
        assert set(p) == {"name", "default"} and all(isinstance(v, str) for v in p.values())
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    for key, cluster in clusters.items():
        assert re.fullmatch(r"[\w\-]{1,100}", key)
        check_types(cluster, CLUSTER_FIELDS, f"job_clusters[{key}].new_cluster")
        assert all(isinstance(v, str) for v in cluster["spark_conf"].values())
        assert all(isinstance(v, str) for v in cluster["spark_env_vars"].values())
    for task in job["tasks"]:
        check_types(task, TASK_FIELDS, f"tasks[{task['task_key']}]")
        assert re.fullmatch(r"[\w\-]{1,100}", task["task_key"])
        assert task["job_cluster_key"] in clusters
        spt = task["spark_python_task"]
        assert set(spt) <= {"python_file", "parameters", "source"} and spt["source"] in ("WORKSPACE", "GIT")
        assert all(isinstance(a, str) for a in spt["parameters"])
        for lib in task["libraries"]:
            assert set(lib) == {"whl"} and lib["whl"].endswith(".whl")


def test_job_runs_on_gpus_with_one_process_per_gpu(job):
    cluster = job["job_clusters"][0]["new_cluster"]
    assert "gpu-ml" in cluster["spark_version"]  # Databricks Runtime for ML, GPU flavour
    assert cluster["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    env = cluster["spark_env_vars"]
    assert env["HF_HOME"].startswith("/local_disk0/")  # the node's local SSD
    assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE"} <= set(env)
    cfg = _job_config(job)
    gpus = cluster["num_workers"] * GPUS_PER_NODE[cluster["node_type_id"]]
    assert cfg.distributed.use_gpu and not cfg.distributed.local_mode
    assert cfg.distributed.num_processes == gpus
    # What the job itself checks on the cluster before launching: it passes.
    launch.check_gpu_conf(cfg.distributed, cluster["spark_conf"].get, {})
    launch.check_shared_paths(cfg, "spark://10.0.0.1:7077")


def test_job_paths_exist_in_the_repository(job):
    task = job["tasks"][0]
    py = task["spark_python_task"]["python_file"]
    assert py.startswith(WORKSPACE_ROOT) and os.path.isfile(os.path.join(ROOT, py[len(WORKSPACE_ROOT):]))
    params = {p["name"]: p["default"] for p in job["parameters"]}
    used = set(re.findall(r"\{\{job\.parameters\.(\w+)\}\}", " ".join(task["spark_python_task"]["parameters"])))
    assert used == set(params), "every job parameter is used, and only defined ones"
    assert params["config"].startswith(WORKSPACE_ROOT)
    assert os.path.isfile(os.path.join(ROOT, params["config"][len(WORKSPACE_ROOT):]))
    # The wheel named in the job is the one setup.py builds.
    setup = open(os.path.join(ROOT, "setup.py")).read()
    name = re.search(r'name="([^"]+)"', setup).group(1).replace("-", "_")
    version = re.search(r'version="([^"]+)"', setup).group(1)
    assert os.path.basename(task["libraries"][0]["whl"]) == f"{name}-{version}-py3-none-any.whl"


def test_job_config_is_valid_and_writes_to_shared_storage(job):
    cfg = _job_config(job)
    assert cfg.spark.master is None  # Databricks provides the cluster
    assert launch.is_shared_path(cfg.output_dir) and launch.is_shared_path(cfg.loader.staging_dir)
    with open(os.path.join(DBX, "finetune_gpu.yaml")) as f:
        first = f.readline()
    assert first.startswith("# databricks bundle")  # each config starts with the command that runs it


def test_bundle_defines_the_same_job(bundle, job):
    assert bundle["bundle"]["name"]
    res = bundle["resources"]["jobs"]["finetune"]
    variables = bundle["variables"]
    text = yaml.safe_dump(bundle)
    for ref in re.findall(r"\$\{var\.(\w+)\}", text):
        assert ref in variables, f"${{var.{ref}}} is not defined"

    def resolve(value):
        if isinstance(value, str):
            return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(variables[m.group(1)]["default"]), value)
        return value

    for key in ("name", "max_concurrent_runs", "timeout_seconds", "schedule"):
        assert res[key] == job[key], key
    bc, jc = res["job_clusters"][0]["new_cluster"], job["job_clusters"][0]["new_cluster"]
    for key in ("spark_version", "node_type_id", "num_workers", "spark_conf", "spark_env_vars"):
        b = {k: resolve(v) for k, v in bc[key].items()} if isinstance(bc[key], dict) else resolve(bc[key])
        assert str(b) == str(jc[key]), key
    bt, jt = res["tasks"][0], job["tasks"][0]
    for key in ("task_key", "max_retries", "min_retry_interval_millis", "retry_on_timeout", "timeout_seconds"):
        assert bt[key] == jt[key], key
    assert bt["spark_python_task"]["parameters"] == jt["spark_python_task"]["parameters"]
    assert [p["name"] for p in res["parameters"]] == [p["name"] for p in job["parameters"]]


def test_bundle_paths_resolve_from_its_folder(bundle):
    res = bundle["resources"]["jobs"]["finetune"]
    here = lambda p: os.path.normpath(os.path.join(DBX, p))  # noqa: E731
    assert os.path.isfile(here(res["tasks"][0]["spark_python_task"]["python_file"]))
    assert os.path.isfile(os.path.join(here(bundle["artifacts"]["spark_tuning_wheel"]["path"]), "setup.py"))
    for p in bundle["sync"]["paths"]:
        assert os.path.isdir(here(p)), p
    whl = res["tasks"][0]["libraries"][0]["whl"]
    assert os.path.normpath(os.path.dirname(here(whl))) == os.path.join(ROOT, "dist")  # where `pip wheel -w dist` puts it
    config = res["parameters"][0]["default"].replace("${workspace.file_path}/", "")
    assert os.path.isfile(os.path.join(ROOT, config))
    assert bundle["targets"]["dev"]["mode"] == "development" and bundle["targets"]["prod"]["mode"] == "production"


def _job_config(job):
    params = {p["name"]: p["default"] for p in job["parameters"]}
    path = os.path.join(ROOT, params["config"][len(WORKSPACE_ROOT):])
    return load_config(path, [f"output_dir={params['output_dir']}"])
