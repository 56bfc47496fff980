"""Security: cleanup removes only what spark-tuning wrote (and only with --yes), `serve --stop` never signals a
stranger, the server is not opened to the network by accident and keeps its state private, and credentials
inside URLs are refused in every config string without being repeated anywhere."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from spark_tuning.errors import InputError


def _file(path, size=100):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * size)


def test_cleanup_never_matches_by_pattern_alone_and_lists_without_yes(tmp_path, capsys):
    """`cleanup --output-dir ~/src/out` beside a `~/src/petastorm` clone and an HF Trainer's checkpoints."""
    from spark_tuning.cli import main
    from spark_tuning.deploy.cleanup import write_staging_marker

    src = tmp_path / "src"
    out = src / "out"
    _file(str(src / "petastorm" / "setup.py"))  # someone's petastorm checkout beside the output
    _file(str(src / ".petastorm_notes"))
    _file(str(out / "checkpoint-500" / "pytorch_model.bin"))  # an HF Trainer run's checkpoint
    _file(str(out / ".spark-tuning.json"))
    _file(str(out / "checkpoints" / "step-00000010" / "COMPLETE"))
    _file(str(src / ".staging" / "notes-of-mine" / "a.txt"))  # not a staging folder spark-tuning made
    live = src / ".staging" / ".run.data-0a1b2c3d"  # this process's marker: a live run
    write_staging_marker(str(live), str(src / ".out.partial-0a1b2c3d"), str(out))
    _file(str(live / "train" / "part-0.parquet"), 3000)
    done = src / ".staging" / ".run.data-99999999"
    _file(str(done / "train" / "part-0.parquet"), 2000)
    (done / ".spark-tuning-staging.json").write_text(json.dumps({"pid": 1, "process_start": -1, "cmdline": []}))
    _file(str(src / ".out.partial-0a1b2c3d" / "config.json"))  # the live run's partial output
    _file(str(src / ".out.partial-12345678" / "config.json"))  # a dead run's
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    assert main(["cleanup", "--output-dir", str(out), "--state-dir", str(tmp_path / "servers")]) == 0
    listed = capsys.readouterr().out
    assert "nothing removed: run again with --yes" in listed
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # a dry run by default
    assert main(["cleanup", "--output-dir", str(out), "--yes", "--state-dir", str(tmp_path / "servers")]) == 0
    capsys.readouterr()
    gone = {done, src / ".out.partial-12345678", out / "checkpoints" / "step-00000010"}
    for path in gone:
        assert not path.exists(), path
    for kept in (src / "petastorm" / "setup.py", src / ".petastorm_notes", out / "checkpoint-500", live,
                 src / ".staging" / "notes-of-mine", src / ".out.partial-0a1b2c3d", out / ".spark-tuning.json"):
        assert kept.exists(), kept


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


def test_serve_stop_never_signals_a_process_that_reused_the_pid(tmp_path, capsys):
    from spark_tuning.cli import main
    from spark_tuning.deploy import serving

    state = tmp_path / "servers"
    state.mkdir()
    stranger = _sleeper()  # what now runs under the recorded pid
    try:
        start, cmdline = serving.process_identity(stranger.pid)
        for port, record in ((1111, {"process_start": start - 1, "cmdline": cmdline}),  # same pid, started later
                             (2222, {"process_start": start, "cmdline": ["python", "-m", "other"]}),
                             (3333, {})):  # a record from before identities were recorded
            s = serving.Server(stranger.pid, "127.0.0.1", port, "models:/m@a", str(state / f"server-{port}.log"),
                               str(state / f"server-{port}.json"), 0.0, **record)
            serving._write_state(s)
        assert main(["serve", "--stop", "--state-dir", str(state)]) == 0
        printed = capsys.readouterr().out
        assert printed.count("dropped the stale record") == 3 and "was not signalled" in printed
        assert stranger.poll() is None  # still running: never signalled
        assert serving.running(str(state)) == []
    finally:
        stranger.kill()
        stranger.wait()


def test_a_server_is_not_opened_to_the_network_by_accident(tmp_path, capsys):
    from spark_tuning.cli import main
    from spark_tuning.deploy import serving

    assert serving.is_loopback("127.0.0.1") and serving.is_loopback("::1") and serving.is_loopback("localhost")
    assert not serving.is_loopback("0.0.0.0") and not serving.is_loopback("192.0.2.7")
    code = main(["serve", "--model-uri", str(tmp_path), "--host", "0.0.0.0", "--state-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "no authentication" in err and "--allow-remote" in err
    assert not (tmp_path / "s").exists()  # refused before anything was started or written


def test_server_state_is_private_and_its_log_never_follows_a_link(tmp_path):
    from spark_tuning.deploy import serving

    state = tmp_path / "servers"
    state.mkdir(mode=0o755)
    port = serving.free_port()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, state / f"server-{port}.log")  # planted in a shared state folder
    with pytest.raises(InputError, match="must be a plain file of yours, not a link"):
        serving.start(str(tmp_path), port=port, state_dir=str(state))
    assert victim.read_text() == "precious"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


URL_FIELDS = ["data.source", "data.eval_source", "model.source", "tracking.tracking_uri", "deploy.registry_uri"]


def test_credentials_inside_urls_are_refused_in_every_field_and_never_repeated(tmp_path, capsys):
    from spark_tuning.cli import main
    from spark_tuning.config import ConfigError, load_config
    from spark_tuning.secrets import scrub

    password = "hunter2-very-secret"
    sets = [f"{k}=https://bob:{password}@example.com/x" for k in URL_FIELDS]
    sets += [f"output_dir={tmp_path / 'out' / 'model'}", "spark.conf={fs.azure.sas: 'https://a.blob.core."
             f"windows.net/c?sv=2022&sig={password}'}}"]
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    msg = str(err.value)
    for field in URL_FIELDS:
        assert f"{field} looks like a password inside a URL" in msg, msg
    assert "looks like a signed URL's signature" in msg and password not in msg
    code = main(["finetune", *sum((["--set", s] for s in sets), [])])
    captured = capsys.readouterr()
    assert code == 2 and password not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # nothing written: no config.yaml, run.json, MLflow store
    # Logs are scrubbed of URL passwords and signatures whatever their source (e.g. a library's message).
    assert scrub(f"GET https://bob:{password}@h/x?sig={password}&a=1") == "GET https://bob:***@h/x?sig=***&a=1"
    # Storage URIs whose user part is a container, not a password, pass.
    load_config(None, ["data.source=abfss://reviews@account.dfs.core.windows.net/imdb",
                       f"output_dir={tmp_path / 'o'}"])


def test_spark_conf_secrets_are_references_resolved_on_the_driver_and_scrubbed(tmp_path, monkeypatch):
    from spark_tuning.config import ConfigError, load_config
    from spark_tuning.secrets import resolve_conf, scrub

    out = f"output_dir={tmp_path / 'o'}"
    with pytest.raises(ConfigError) as err:
        load_config(None, [out, "spark.conf={fs.s3a.secret.key: abc123xyz, 'fs.azure.account.key.a.dfs.core.windows.net': k}"])
    msg = str(err.value)
    assert "spark.conf['fs.s3a.secret.key'] names a secret" in msg and "abc123xyz" not in msg
    assert "spark.conf['fs.azure.account.key.a.dfs.core.windows.net'] names a secret" in msg
    cfg = load_config(None, [out, "spark.conf={fs.s3a.secret.key: 'env:MY_S3_SECRET', "
                                  "fs.s3a.aws.credentials.provider: org.example.Provider}"])
    monkeypatch.setenv("MY_S3_SECRET", "s3-secret-value-42")
    monkeypatch.setenv("MY_PLAIN_NAME", "x")
    assert resolve_conf(cfg.spark.conf)["fs.s3a.secret.key"] == "s3-secret-value-42"
    monkeypatch.delenv("MY_S3_SECRET")  # resolved values stay scrubbed after the variable is gone
    assert "s3-secret-value-42" not in scrub("conf fs.s3a.secret.key=s3-secret-value-42")


def test_the_watchdog_gets_the_tracking_uri_through_its_environment(tmp_path, monkeypatch):
    """`ps` shows every user a command line: a database URI with a password must not be on it. Nor does the
    watchdog get the hub token handed to the run's workers: it loads no model."""
    import mlflow
    import psutil

    from spark_tuning.deploy.serving import process_identity
    from spark_tuning.secrets import HUB_TOKEN_ENV
    from spark_tuning.track import watchdog

    monkeypatch.setenv(HUB_TOKEN_ENV, "hub-token-of-the-workers")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("w"))
    proc = watchdog.start(uri, run.info.run_id)
    try:
        _, cmdline = process_identity(proc.pid)
        assert cmdline and not any(uri in a or "mlflow.db" in a for a in cmdline), cmdline
        environ = psutil.Process(proc.pid).environ()
        assert environ[watchdog.URI_ENV] == uri and HUB_TOKEN_ENV not in environ
        client.set_terminated(run.info.run_id, "FINISHED")  # the watchdog exits once the run has ended
        proc.wait(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_one_run_per_output_folder_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    import logging

    from spark_tuning.finetune import output_lock

    out = str(tmp_path / "model")
    with output_lock(out) as held:
        assert os.path.isfile(held) and json.load(open(held))["pid"] == os.getpid()
        with pytest.raises(InputError, match=rf"in use by another run: pid {os.getpid()}"):
            with output_lock(out):
                pass
        assert os.path.isfile(held)  # the refused run did not take or remove it
    assert not os.path.exists(held)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open(held, "w") as f:
        json.dump({"pid": gone.pid, "process_start": 1, "cmdline": ["python"], "started": 0}, f)
    with caplog.at_level(logging.WARNING), output_lock(out) as again:
        assert json.load(open(again))["pid"] == os.getpid()
    assert "was left by a run that is gone" in caplog.text and not os.path.exists(held)


def test_the_relay_stops_at_the_first_failure_of_an_unreachable_store(tmp_path, monkeypatch, caplog):
    """A tracking server that goes away mid-training: one warning, no further tries per event (each would
    wait through MLflow's retries), and the driver is not held up."""
    import logging
    import time

    from spark_tuning.deploy.serving import free_port
    from spark_tuning.track import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"metrics": {"train_loss": 1.0 / s}, "step": s}) + "\n" for s in range(1, 30)))
    ref = tracking.RunRef(f"http://127.0.0.1:{free_port()}", "0" * 32, "0")
    t = time.monotonic()
    with caplog.at_level(logging.WARNING), tracking.relay(ref, str(events), every_s=0.1):
        time.sleep(1.0)
    assert time.monotonic() - t < 20
    assert caplog.text.count("the MLflow tracking store failed") == 1, caplog.text


def test_tracebacks_are_scrubbed_in_logs_and_when_uncaught(tmp_path):
    """log.exception and an uncaught exception print tracebacks, which may hold a secret in a message."""
    code = ("import logging, os, sys\n"
            "from spark_tuning.secrets import install_log_scrubbing\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "install_log_scrubbing()\n"
            "try:\n"
            "    raise RuntimeError('could not connect to ' + os.environ['URI'])\n"
            "except RuntimeError:\n"
            "    logging.getLogger('x').exception('failed')\n"
            "raise ValueError('token ' + os.environ['MY_API_TOKEN'])\n")
    env = {**os.environ, "URI": "postgresql://bob:pa55word-xyz@db/mlflow", "MY_API_TOKEN": "tok-1234567890abcdef"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError" in proc.stderr
    assert "pa55word-xyz" not in proc.stderr and "tok-1234567890abcdef" not in proc.stderr, proc.stderr
