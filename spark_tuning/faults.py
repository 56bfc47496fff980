"""When a training process dies, say which one and show its last lines.

pyspark's torchrun wrapper exits 0 whatever happens, so TorchDistributor only reports "failed during
training". Each rank therefore writes its own log file into the staging folder (shared storage), and
ends it with a status line: FINISHED, FAILED (with the exception), or STOPPED when torchrun terminates it
because another rank failed. A rank whose log ends with none of these died without a word (SIGKILL, the
out-of-memory killer, a segfault): that is the one to blame.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import signal
import sys
import time
from typing import Optional

FINISHED, FAILED, STOPPED = "STATUS FINISHED", "STATUS FAILED", "STATUS STOPPED"

# Records for the rank's own file only: every rank's progress, which the console shows for rank 0 alone.
# Without a rank file (no log_dir) they go nowhere.
rank_only = logging.getLogger("spark_tuning.rank")
rank_only.propagate = False
rank_only.setLevel(logging.INFO)
rank_only.addHandler(logging.NullHandler())


def log_path(log_dir: str, rank: int) -> str:
    return os.path.join(log_dir, f"rank-{rank}.log")


def start_rank_log(log_dir: Optional[str], rank: int) -> None:
    """Copy this rank's log records into its own file, and record a SIGTERM from torchrun."""
    if not log_dir:
        return
    os.makedirs(log_dir, exist_ok=True)
    handler = logging.FileHandler(log_path(log_dir, rank))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    rank_only.addHandler(handler)
    logger = logging.getLogger("spark_tuning.faults")

    def on_sigterm(signum, frame):
        logger.error("%s: terminated by torchrun (another process failed)", STOPPED)
        handler.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    logger.info("rank %d started, pid %d", rank, os.getpid())


_SKIPS_TEARDOWN = []  # set once exit_without_teardown is armed in this process


def teardown_skipped() -> bool:
    """Whether this process ends with os._exit (exit_without_teardown armed): then nothing needs tearing down."""
    return bool(_SKIPS_TEARDOWN)


def exit_without_teardown() -> None:
    """At exit, end this training process with os._exit instead of tearing the interpreter down.

    Once TorchDistributor's script has written the result there is nothing left to do, yet unloading torch
    and transformers takes about 2 s per process here, every job. Call this before importing them: the
    handler is then the last to run, after theirs (atexit runs handlers in reverse order of registration).
    It flushes logs and streams first; an uncaught exception still exits 1. Only in a process that torchrun
    started (a benchmark may call train_fn in its own process, whose exit is its own business).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    failed = []
    previous = sys.excepthook

    def note_failure(*exc_info):
        failed.append(exc_info[0])
        previous(*exc_info)

    def finish():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1 if failed else 0)

    sys.excepthook = note_failure
    atexit.register(finish)
    _SKIPS_TEARDOWN.append(True)


def describe_failure(log_dir: Optional[str], settle_s: float = 0.0) -> Optional[str]:
    """A short account of a failed training: the rank to blame, how it ended, and its last log lines.

    `settle_s`: on a cluster, Spark fails the job as soon as one barrier task fails, while the training
    processes of the other tasks may still be on their way out (noticing the lost peer, or being stopped).
    Until they have written their status line they look as silent as the dead one: wait up to `settle_s`
    seconds for a single silent rank to stand out."""
    if not log_dir or not os.path.isdir(log_dir):
        return None
    deadline = time.monotonic() + settle_s
    while True:
        ranks = _read_logs(log_dir)
        states = {r: _status(lines) for r, lines in sorted(ranks.items())}
        died = [r for r, s in states.items() if s == "died"]
        if len(died) <= 1 or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not ranks:
        return None
    blamed = died or [r for r, s in states.items() if s == FAILED]
    if not blamed:
        return None
    r = blamed[0]
    if states[r] == "died":
        who = f"training process rank {r}" if len(died) == 1 else \
            "training processes " + ", ".join(f"rank {k}" for k in died)
        how = "died without a word (killed by a signal such as SIGKILL, or by the out-of-memory killer)"
    else:
        who, how = f"training process rank {r}", "raised an error"
    others = ", ".join(f"rank {k}: {'stopped by torchrun' if s == STOPPED else s.split()[-1].lower()}"
                       for k, s in states.items() if k not in died and k != r)
    # When the first line ("rank N started, pid P") is among the last ones, its pid is worth keeping: the
    # kernel's out-of-memory report names processes by pid.
    tail = ranks[r][-15:]
    return "\n".join([f"{who} {how}" + (f"; {others}" if others else ""),
                      f"last log lines of rank {r}:", *("  " + line for line in tail)])


def _read_logs(log_dir: str) -> dict[int, list[str]]:
    ranks = {}
    for path in glob.glob(os.path.join(log_dir, "rank-*.log")):
        rank = int(re.search(r"rank-(\d+)\.log$", path).group(1))
        try:
            with open(path, errors="replace") as f:
                ranks[rank] = f.read().splitlines()
        except OSError:  # removed meanwhile
            continue
    return ranks


def _status(lines: list[str]) -> str:
    text = "\n".join(lines[-50:])
    for s in (FINISHED, FAILED, STOPPED):
        if s in text:
            return s
    return "died"
