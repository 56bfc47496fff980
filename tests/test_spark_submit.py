"""spark-submit.sh: its help, the command it prints, what it passes through. Runs with --dry-run, so no
Spark starts (a few seconds); the real submissions are in test_cluster.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "spark-submit.sh")


def run(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPARK_TUNING_PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def printed_command(proc: subprocess.CompletedProcess) -> list[str]:
    lines = [l for l in proc.stderr.splitlines() if l.startswith("+ ")]
    assert len(lines) == 1, proc.stderr
    return shlex.split(lines[0][2:])


def test_help_explains_every_option():
    proc = run("--help")
    assert proc.returncode == 0
    for word in ("--set KEY=VALUE", "--overwrite", "--master URL", "local[*]", "--dry-run", "-- OPTIONS",
                 "--py-files", "--files", "SPARK_TUNING_PYTHON", "loader.staging_dir", "printed"):
        assert word in proc.stdout, word
    assert "set -euo" not in proc.stdout


def test_local_by_default_without_shipping_the_package():
    cmd = printed_command(run("--dry-run"))
    assert cmd[cmd.index("--master") + 1] == "local[*]"
    assert "--py-files" not in cmd
    assert cmd[-2:] == ["--config", os.path.join(ROOT, "conf", "quickstart.yaml")] or \
        cmd[cmd.index("--config") + 1].endswith("conf/quickstart.yaml")


def test_cluster_master_ships_package_and_config_and_passes_options_through(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("# ./spark-submit.sh job.yaml\nspark:\n  master: local[1]\n")
    proc = run(str(cfg), "--master", "spark://10.0.0.1:7077", "--set", "train.epochs=1", "--overwrite",
               "--dry-run", "--", "--conf", "spark.task.cpus=2", "--executor-memory", "3g")
    assert proc.returncode == 0, proc.stderr
    cmd = printed_command(proc)
    job = cmd.index(os.path.join(ROOT, "jobs", "finetune.py"))
    submit_opts, job_args = cmd[:job], cmd[job + 1:]
    assert submit_opts[submit_opts.index("--master") + 1] == "spark://10.0.0.1:7077"  # --master beats the file
    zip_path = submit_opts[submit_opts.index("--py-files") + 1]
    assert submit_opts[submit_opts.index("--files") + 1] == str(cfg)
    # Everything after -- reaches spark-submit unchanged, in order, before the application.
    assert submit_opts[-4:] == ["--conf", "spark.task.cpus=2", "--executor-memory", "3g"]
    assert job_args == ["--config", str(cfg), "--set", "train.epochs=1", "--overwrite"]
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
    assert "spark_tuning/train/loop.py" in names and "spark_tuning/resources/quickstart_reviews.jsonl" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # Unchanged sources: the archive is reused, not rebuilt.
    again = run(str(cfg), "--master", "spark://10.0.0.1:7077", "--dry-run")
    assert "reusing" in again.stderr


def test_config_master_is_used_when_none_is_given(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("# ./spark-submit.sh job.yaml\nspark:\n  master: local[1]\n")
    cmd = printed_command(run(str(cfg), "--dry-run"))
    assert cmd[cmd.index("--master") + 1] == "local[1]"
    cmd = printed_command(run(str(cfg), "--set", "spark.master=local[2]", "--dry-run"))
    assert cmd[cmd.index("--master") + 1] == "local[2]"


@pytest.mark.parametrize("args, message", [
    (["--set", "train.epochz=1"], "did you mean 'train.epochs'"),
    (["--bogus"], "unknown argument '--bogus'"),
    (["missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["--master"], "--master needs a URL"),
])
def test_bad_arguments_exit_2_before_spark(args, message):
    proc = run(*args, "--dry-run")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not [l for l in proc.stderr.splitlines() if l.startswith("+ ")]


def test_config_sent_with_files_is_found_in_the_working_folder(tmp_path):
    """In --deploy-mode cluster the driver runs elsewhere; --files puts the config in its working folder."""
    sys.path.insert(0, os.path.join(ROOT, "jobs"))
    try:
        from finetune import _config_here
    finally:
        sys.path.pop(0)
    (tmp_path / "job.yaml").write_text("seed: 1\n")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert _config_here(["--config", "/elsewhere/conf/job.yaml", "--overwrite"]) == ["--config", "job.yaml", "--overwrite"]
        assert _config_here(["--config", str(tmp_path / "job.yaml")]) == ["--config", str(tmp_path / "job.yaml")]
    finally:
        os.chdir(old)
