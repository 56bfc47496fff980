"""A real Spark standalone cluster on 127.0.0.1 for tests: one master and N workers, started from the
installed pyspark (`bin/spark-class`, which the pip package ships; it has no start-master.sh), in a
process group of their own, and stopped (group killed, folders removed) whatever happens."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


@dataclass
class StandaloneCluster:
    workers: int = 2
    cores: int = 1
    memory: str = "2g"
    env: Optional[dict] = None  # environment of the master and workers (and so of the executors)
    root: str = ""
    master_port: int = 0
    webui_port: int = 0
    procs: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    def start(self, timeout_s: float = 90.0) -> "StandaloneCluster":
        self.root = tempfile.mkdtemp(prefix="spark-standalone-")
        env = dict(self.env if self.env is not None else os.environ)
        env.update(SPARK_LOCAL_IP="127.0.0.1", SPARK_HOME=spark_home(), SPARK_LOG_DIR=self._dir("logs"),
                   SPARK_PID_DIR=self._dir("pids"), SPARK_WORKER_DIR=self._dir("work"), SPARK_NO_DAEMONIZE="1",
                   SPARK_MASTER_OPTS="-Dspark.deploy.defaultCores=2", SPARK_DAEMON_MEMORY="256m",
                   # Short-lived daemons on a shared 2-core machine: the first JIT tier alone starts faster.
                   SPARK_DAEMON_JAVA_OPTS="-XX:TieredStopAtLevel=1")
        self.master_port, self.webui_port = free_port(), free_port()
        cls = os.path.join(spark_home(), "bin", "spark-class")
        try:
            self._spawn([cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                         "--port", str(self.master_port), "--webui-port", str(self.webui_port)], env, "master")
            self._wait(lambda: self._state() is not None, timeout_s, "the master to answer")
            for i in range(self.workers):
                self._spawn([cls, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                             "--port", str(free_port()), "--webui-port", str(free_port()), "--cores", str(self.cores),
                             "--memory", self.memory, "--work-dir", self._dir(f"work/worker-{i}"), self.url],
                            env, f"worker-{i}")
            self._wait(lambda: self.alive_workers() >= self.workers, timeout_s, f"{self.workers} workers to register")
        except BaseException:
            self.stop()
            raise
        return self

    def alive_workers(self) -> int:
        state = self._state() or {}
        return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon's and executor's log: for failure messages."""
        out = []
        for folder, _, files in os.walk(self.root):
            for name in sorted(files):
                if name.endswith((".log", ".out")) or name in ("stderr", "stdout"):
                    path = os.path.join(folder, name)
                    with open(path, errors="replace") as f:
                        lines = f.read().splitlines()[-tail:]
                    out.append(f"==> {os.path.relpath(path, self.root)} <==\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for proc, log in reversed(self.procs):
            _kill_group(proc)
            log.close()
        self.procs.clear()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------

    def _dir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _spawn(self, cmd: list[str], env: dict, name: str) -> None:
        log = open(os.path.join(self._dir("logs"), f"{name}.out"), "wb")
        # A process group of its own: stop() ends the JVM and anything it started, and nothing else.
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append((proc, log))

    def _state(self) -> Optional[dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.webui_port}/json/", timeout=2) as r:
                return json.load(r)
        except (OSError, ValueError):
            return None

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p for p, _ in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"a daemon exited with code {dead[0].returncode}" if dead else f"{timeout_s:.0f}s passed"
                raise RuntimeError(f"standalone cluster: waiting for {what}, {why}:\n{self.logs()}")
            time.sleep(0.5)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    else:
        # The JVM is gone, but executors it started may live on in its group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
