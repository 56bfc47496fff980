"""cleanup: staging data, caches, interrupted outputs, checkpoints and dead servers' files go; the model stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _file(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * size)


def _layout(root):
    out = root / "model"
    keep = ["model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/metrics.json",
            "model/.spark-tuning.json", "mlflow.db", "mlartifacts/1/a/artifacts/model/MLmodel",
            # not spark-tuning's names: never matched by a pattern
            ".staging/petastorm-cache/part-0", ".petastorm_cache/part-0", "model/checkpoint-7/part-0"]
    gone = {
        ".staging/.run.data-1234abcd": 3000,  # staged Parquet of a finished run (its marker: a dead process)
        ".model.partial-deadbeef": 700,  # an interrupted run's half-written output
        "model/checkpoints/step-00000010": 1000,
        "model/checkpoints/step-00000200": 1000,
    }
    for rel in keep:
        _file(str(root / rel), 100)
    for rel, size in gone.items():
        _file(str(root / rel / "part-0"), size)
    (root / ".staging" / ".run.data-1234abcd" / ".spark-tuning-staging.json").write_text(
        json.dumps({"pid": 1, "process_start": -1, "cmdline": ["gone"]}))
    return out, keep, gone


def _servers(state):
    os.makedirs(state)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for port, pid in ((1111, dead.pid), (2222, os.getpid())):  # a finished process, and a live one (this one)
        (state / f"server-{port}.json").write_text(json.dumps({"pid": pid, "port": port}))
        (state / f"server-{port}.log").write_text("log\n" * 10)


def test_dry_run_lists_and_removes_nothing(tmp_path):
    from spark_tuning.cli import main

    out, keep, gone = _layout(tmp_path / "out")
    _servers(tmp_path / "servers")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["cleanup", "--output-dir", str(out), "--dry-run", "--state-dir", str(tmp_path / "servers")]) == 0
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_cleanup_removes_leftovers_and_keeps_the_model(tmp_path, capsys):
    from spark_tuning.deploy import cleanup

    root = tmp_path / "out"
    out, keep, gone = _layout(root)
    _servers(tmp_path / "servers")
    items = cleanup.find(str(out), keep_last_checkpoint=True, state_dir=str(tmp_path / "servers"))
    kinds = {os.path.relpath(i.path, tmp_path): i.kind for i in items}
    assert kinds == {
        "out/.staging/.run.data-1234abcd": "staging", "out/.model.partial-deadbeef": "partial",
        "out/model/checkpoints/step-00000010": "checkpoint",
        "servers/server-1111.json": "server", "servers/server-1111.log": "server",
    }
    freed = cleanup.remove(items)
    assert freed == sum(i.bytes for i in items) >= 3000 + 700 + 1000
    for rel in keep:
        assert (root / rel).exists(), rel
    assert (out / "checkpoints" / "step-00000200").exists()  # the last checkpoint, kept on request
    assert (tmp_path / "servers" / "server-2222.json").exists() and (tmp_path / "servers" / "server-2222.log").exists()
    assert cleanup.find(str(out), keep_last_checkpoint=True, state_dir=str(tmp_path / "servers")) == []
    # Without keep_last_checkpoint the last one goes too.
    [last] = cleanup.find(str(out), state_dir=str(tmp_path / "servers"))
    assert last.path.endswith("step-00000200")


def test_cleanup_of_a_missing_folder_is_bad_input(tmp_path):
    from spark_tuning.cli import main

    assert main(["cleanup", "--output-dir", str(tmp_path / "nope" / "model")]) == 2


def test_an_interrupted_runs_folder_goes_only_when_its_run_is_over(tmp_path):
    """The run folder beside the output (`.model.run`: run.json and the checkpoints a rerun resumes from)
    is listed as a whole, or only its older checkpoints with keep_last_checkpoint; never while the run
    holding the output's lock is alive."""
    from spark_tuning.deploy import cleanup
    from spark_tuning.deploy.serving import this_process

    out = tmp_path / "model"
    servers = str(tmp_path / "servers")
    run = tmp_path / ".model.run"
    _file(str(run / "run.json"), 10)
    for step in ("00000010", "00000020"):
        _file(str(run / "checkpoints" / f"step-{step}" / "COMPLETE"), 10)
    assert [(os.path.basename(i.path), i.kind) for i in cleanup.find(str(out), state_dir=servers)] == [(".model.run", "run")]
    older = cleanup.find(str(out), keep_last_checkpoint=True, state_dir=servers)
    assert [(os.path.basename(i.path), i.kind) for i in older] == [("step-00000010", "checkpoint")]
    (run / "checkpoints" / "step-00000020" / "trainer_state.json").write_text(json.dumps({"best_step": 10}))
    assert cleanup.find(str(out), keep_last_checkpoint=True, state_dir=servers) == []  # keep_best's stays
    (tmp_path / ".model.lock").write_text(json.dumps(this_process()))  # a live run (this process) holds it
    assert cleanup.find(str(out), state_dir=servers) == []
    (tmp_path / ".model.lock").write_text(json.dumps({"pid": 1, "process_start": -1, "cmdline": ["gone"]}))
    assert [i.kind for i in cleanup.find(str(out), state_dir=servers)] == ["run"]
