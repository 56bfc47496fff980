"""When a training process dies, say which one and show its last lines.

pyspark's torchrun wrapper exits 0 whatever happens, so TorchDistributor only reports "failed during
training". Each rank therefore writes its own log file into the staging folder (shared storage), and
ends it with a status line: FINISHED, FAILED (with the exception), or STOPPED when torchrun terminates it
because another rank failed. A rank whose log ends with none of these died without a word (SIGKILL, the
out-of-memory killer, a segfault): that is the one to blame.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import signal
from typing import Optional

FINISHED, FAILED, STOPPED = "STATUS FINISHED", "STATUS FAILED", "STATUS STOPPED"


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
    logger = logging.getLogger("spark_tuning.faults")

    def on_sigterm(signum, frame):
        logger.error("%s: terminated by torchrun (another process failed)", STOPPED)
        handler.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    logger.info("rank %d started, pid %d", rank, os.getpid())


def describe_failure(log_dir: Optional[str]) -> Optional[str]:
    """A short account of a failed training: the rank to blame, how it ended, and its last log lines."""
    if not log_dir or not os.path.isdir(log_dir):
        return None
    ranks = {}
    for path in glob.glob(os.path.join(log_dir, "rank-*.log")):
        rank = int(re.search(r"rank-(\d+)\.log$", path).group(1))
        with open(path, errors="replace") as f:
            ranks[rank] = f.read().splitlines()
    if not ranks:
        return None

    def status(lines: list[str]) -> str:
        text = "\n".join(lines[-50:])
        for s in (FINISHED, FAILED, STOPPED):
            if s in text:
                return s
        return "died"

    states = {r: status(lines) for r, lines in sorted(ranks.items())}
    blamed = [r for r, s in states.items() if s == "died"] or [r for r, s in states.items() if s == FAILED]
    if not blamed:
        return None
    r = blamed[0]
    how = ("died without a word (killed by a signal such as SIGKILL, or by the out-of-memory killer)"
           if states[r] == "died" else "raised an error")
    others = ", ".join(f"rank {k}: {'stopped by torchrun' if s == STOPPED else s.split()[-1].lower()}"
                       for k, s in states.items() if k != r)
    tail = [line for line in ranks[r] if "rank %d started" % r not in line][-15:]
    return "\n".join([f"training process rank {r} {how}" + (f"; {others}" if others else ""),
                      f"last log lines of rank {r}:", *("  " + line for line in tail)])
