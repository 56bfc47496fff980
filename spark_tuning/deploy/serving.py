"""A local HTTP server for a logged model: MLflow's scoring server, started and stopped cleanly.

`start` runs MLflow's scoring app (the one `mlflow models serve --env-manager local` runs, in this
interpreter) behind spark-tuning's request guard (deploy/scoring_app.py: a body that is not JSON gets 400
without being repeated) in its own process group, waits until /ping answers, and writes a state file (pid,
port, URL, log) so that `spark-tuning serve --stop` from another shell finds it. `stop` ends the whole
group: uvicorn's workers would otherwise be orphaned.

Endpoints (MLflow's): GET /ping, GET /version, POST /invocations with
  {"dataframe_records": [{"text": "..."}]}, {"dataframe_split": ...} or {"inputs": ["...", ...]}.
Malformed requests get HTTP 400 with a JSON error (the model checks its input; see serving_model.py).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Optional

from spark_tuning.errors import InputError, JobFailed

log = logging.getLogger("spark_tuning.serving")


def default_state_dir() -> str:
    return os.environ.get("SPARK_TUNING_STATE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "spark-tuning", "servers")


@dataclass
class Server:
    pid: int  # also the process group id: the server leads its own group
    host: str
    port: int
    model_uri: str
    log_path: str
    state_path: str
    started: float
    # Who the pid was when recorded: its start time (clock ticks after boot) and command line. A pid is
    # signalled only while both still match: after a crash or a reboot the number may be someone else's.
    process_start: Optional[int] = None
    cmdline: Optional[list] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def invocations_url(self) -> str:
        return self.url + "/invocations"


def process_identity(pid: int) -> tuple[Optional[int], Optional[list]]:
    """(start time in clock ticks after boot, command line) of a running process; (None, None) if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = int(f.read().rsplit(")", 1)[-1].split()[19])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        return start, cmdline
    except (OSError, ValueError, IndexError):
        return None, None


def this_process() -> dict:
    """This process as a record (pid, start time, command line) that `same_process` can check later."""
    start, cmdline = process_identity(os.getpid())
    return {"pid": os.getpid(), "process_start": start, "cmdline": cmdline}


def same_process(record: dict) -> bool:
    """Whether the record's pid still runs as the process recorded (same start time and command line): a pid
    outlives its process after a crash or a reboot, and may be someone else's by now."""
    try:
        start, cmdline = process_identity(int(record["pid"]))
    except (KeyError, TypeError, ValueError):
        return False
    return start is not None and (start, cmdline) == (record.get("process_start"), record.get("cmdline"))


def is_ours(server: Server) -> bool:
    """Whether the recorded pid still is the server that was recorded."""
    return same_process(asdict(server))


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """A busy port is bad input: the new server could not bind, and /ping might be answered by whatever
    already listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise InputError(f"--port {port}: {host}:{port} is already in use: stop what listens there, choose "
                             "another --port, or pass --port 0 for a free one") from None


def ping(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/ping", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start(model_uri: str, host: str = "127.0.0.1", port: int = 0, tracking_uri: Optional[str] = None,
          state_dir: Optional[str] = None, timeout: float = 180.0, workers: int = 1, allow_remote: bool = False,
          max_rows: int = 1000, max_bytes: int = 16 * 1024 * 1024) -> Server:
    """Start the scoring server and return once it answers /ping. Raises JobFailed (with the end of its log)
    when it exits or does not answer within `timeout` seconds. A host other than loopback needs
    `allow_remote`: the endpoint has no authentication. Requests over `max_rows` rows or `max_bytes` bytes
    get 400."""
    from spark_tuning.deploy.scoring_app import MAX_BYTES_ENV, MAX_ROWS_ENV

    if not is_loopback(host):
        if not allow_remote:
            raise InputError(f"--host {host} opens the model server to the network, and its endpoint has no "
                             "authentication: anyone who reaches the port can use it. Keep the default 127.0.0.1 "
                             "(and reach it through an authenticating proxy or an SSH tunnel), or pass "
                             "--allow-remote to do it anyway")
        log.warning("serving on %s: reachable from the network WITHOUT authentication (--allow-remote)", host)
    if model_uri.startswith("models:/") and not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise InputError(f"--model-uri {model_uri} names a registered model, but no tracking URI is set: pass "
                         "--tracking-uri (e.g. sqlite:///outputs/mlflow.db) or set MLFLOW_TRACKING_URI")
    if not model_uri.startswith(("models:/", "runs:/")) and "://" not in model_uri and not os.path.isdir(model_uri):
        raise InputError(f"--model-uri {model_uri!r} is neither models:/..., runs:/... nor an existing folder")
    if port:
        check_port_free(host, port)
    port = port or free_port(host)
    state_dir = state_dir or default_state_dir()
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)  # pids, ports and logs of this user's servers: not for others to read or plant
    log_path = os.path.join(state_dir, f"server-{port}.log")
    from spark_tuning.secrets import environment_without_shared

    env = environment_without_shared()  # it serves a logged model: no hub token needed
    env[MAX_ROWS_ENV], env[MAX_BYTES_ENV] = str(max_rows), str(max_bytes)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # MLflow runs `uvicorn` by name: it must be this interpreter's, also when the venv is not activated.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "spark_tuning.deploy.scoring_app", model_uri, host, str(port), str(workers)]
    try:  # never through a link planted where the log goes
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise InputError(f"the server log {log_path} cannot be opened ({e.strerror}): it must be a plain file of "
                         "yours, not a link; remove it or choose another --state-dir") from None
    with os.fdopen(fd, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    server = Server(proc.pid, host, port, model_uri, log_path, os.path.join(state_dir, f"server-{port}.json"),
                    time.time(), *process_identity(proc.pid))
    _write_state(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _forget(server)
            raise JobFailed(f"the model server for {model_uri} exited with code {proc.returncode}:\n"
                            f"{_tail(log_path)}")
        if ping(server.url):
            log.info("serving %s at %s (pid %d, log %s)", model_uri, server.url, server.pid, log_path)
            return server
        time.sleep(0.5)
    stop(server)
    raise JobFailed(f"the model server for {model_uri} did not answer {server.url}/ping within {timeout:.0f}s:\n"
                    f"{_tail(log_path)}")


def stop(server: Server, grace: float = 10.0) -> bool:
    """End the server's process group (SIGTERM, then SIGKILL after `grace` s) and remove its state file.
    Returns False when it was not running any more: its process is gone, or the pid now belongs to another
    process (another start time or command line), which is never signalled."""
    was_running = process_alive(server.pid) and is_ours(server)
    if was_running:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(server.pid):
                _reap(server.pid)
                time.sleep(0.1)
            if not _group_alive(server.pid):
                break
    _reap(server.pid)
    _forget(server)
    return was_running


def running(state_dir: Optional[str] = None) -> list[Server]:
    """Servers recorded in `state_dir` (stale records of dead servers are included: stop() clears them)."""
    out = []
    for path in sorted(glob.glob(os.path.join(state_dir or default_state_dir(), "server-*.json"))):
        try:
            with open(path) as f:
                out.append(Server(**json.load(f)))
        except (OSError, ValueError, TypeError):
            continue
    return out


def stop_recorded(state_dir: Optional[str] = None, port: Optional[int] = None) -> list[tuple[Server, bool]]:
    """`serve --stop`: stop every recorded server (or the one on `port`)."""
    servers = [s for s in running(state_dir) if port in (None, s.port)]
    return [(s, stop(s)) for s in servers]


def serve_forever(server: Server) -> None:
    """Block until Ctrl-C (or SIGTERM), or until the server dies; then stop it."""
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while process_alive(server.pid):
            _reap(server.pid)
            time.sleep(0.5)
        raise JobFailed(f"the model server exited on its own:\n{_tail(server.log_path)}")
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)
        signal.signal(signal.SIGTERM, previous)


def post_json(url: str, payload, timeout: float = 120.0) -> tuple[int, object]:
    """POST JSON; returns (status, parsed body or raw text). HTTP errors are returned, not raised."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode(errors="replace")


# ----------------------------------------------------------------------------------------------------


def _write_state(server: Server) -> None:
    tmp = server.state_path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(server), f, indent=2)
    os.replace(tmp, server.state_path)


def _forget(server: Server) -> None:
    try:
        os.remove(server.state_path)
    except FileNotFoundError:
        pass


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Only zombies left (children of ours not yet reaped) count as gone.
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
