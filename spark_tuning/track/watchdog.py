"""Marks an MLflow run FAILED when the driver that owns it dies without saying so (SIGKILL, OOM).

The driver starts this as a detached process (its own session, so it outlives the driver): it polls every
second; when the driver's process is gone and the run is still RUNNING, it marks the run FAILED. It exits
as soon as the run has ended in any way, so a finished job leaves nothing behind.

    SPARK_TUNING_WATCHDOG_URI=<tracking uri> python -m spark_tuning.track.watchdog DRIVER_PID RUN_ID

The tracking URI travels in the environment, not on the command line, where any user's `ps` would show it
(and a database URI may carry credentials).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


URI_ENV = "SPARK_TUNING_WATCHDOG_URI"


def start(tracking_uri: str, run_id: str):
    from spark_tuning.secrets import environment_without_shared

    return subprocess.Popen([sys.executable, "-m", "spark_tuning.track.watchdog", str(os.getpid()), run_id],
                            env={**environment_without_shared(), URI_ENV: tracking_uri}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def main(pid: int, tracking_uri: str, run_id: str, interval: float = 1.0) -> None:
    from mlflow import MlflowClient

    from spark_tuning.deploy.serving import process_alive

    client = MlflowClient(tracking_uri)
    while True:
        try:
            status = client.get_run(run_id).info.status
        except Exception:  # noqa: BLE001 - the store may be briefly locked; try again
            status = "RUNNING"
        if status != "RUNNING":
            return
        if not process_alive(pid):
            client.set_terminated(run_id, status="FAILED")
            client.set_tag(run_id, "spark_tuning.failure", "the driver process died (killed) mid-run")
            return
        time.sleep(interval)


if __name__ == "__main__":
    main(int(sys.argv[1]), os.environ[URI_ENV], sys.argv[2])
