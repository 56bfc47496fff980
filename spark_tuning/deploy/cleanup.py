"""`spark-tuning cleanup`: remove what a run leaves behind that is not the model.

Only what spark-tuning made, found by its own names and markers, never by a pattern alone:
  staging     a run's staging folder `<output root>/.staging/.run.data-XXXXXXXX` holding the marker
              finetune writes there (STAGING_MARKER), unless that run is still going (its recorded process
              is alive with the same start time and command line); petastorm caches live inside them
  partial     half-written or replaced outputs: `<root>/.<name>.partial-XXXXXXXX` and `.old-XXXXXXXX`
              (spark-tuning's exact sibling names), unless a live run's marker names them
  run         an interrupted run's folder `<root>/.<name>.run` (run.json and its checkpoints: what a rerun
              resumes from), unless the run holding the output's lock `.<name>.lock` is still going; with
              keep_last_checkpoint only its older checkpoints go (not the train.keep_best one the newest
              refers to)
  checkpoint  `checkpoints/step-NNNNNNNN` (and cut-short `.tmp-`/`.old-` ones) in such a run folder, or in
              a finished model spark-tuning wrote (checkpoint.keep_after_success); with keep_last_checkpoint
              the highest step stays. An HF Trainer's `checkpoint-NNN` folders are never touched.
  server      state and log files `server-PORT.json|log` of model servers that are not running any more
Never removed: the final model, metrics, the MLflow store and artifacts, and any folder that is or holds the
working directory, the home folder or the checkout. `spark-tuning cleanup` lists; `--yes` removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from spark_tuning.errors import InputError

STAGING_MARKER = ".spark-tuning-staging.json"  # in every run's staging folder: whose it is (pid, start, cmdline)
STAGING_NAME = re.compile(r"^\.run\.data-[0-9a-f]{8}$")
CHECKPOINT_NAME = re.compile(r"^(\.tmp-|\.old-)?step-\d{8}")


@dataclass(frozen=True)
class Item:
    path: str
    kind: str
    bytes: int


def size_of(path: str) -> int:
    if os.path.islink(path) or os.path.isfile(path):
        return os.lstat(path).st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _step(path: str) -> int:
    m = re.search(r"step-(\d{8})", os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else -1


def write_staging_marker(folder: str, partial: str, out: str) -> None:
    """What finetune writes into its staging folder: this process (so cleanup can tell a live run) and the
    partial folder it writes into."""
    from spark_tuning.deploy.serving import this_process

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, STAGING_MARKER), "w") as f:
        json.dump({**this_process(), "partial": partial, "output_dir": out}, f)


def live_marker(folder: str) -> Optional[dict]:
    """The staging marker of `folder` when its run's process is still the one recorded, else None."""
    from spark_tuning.deploy.serving import same_process

    try:
        with open(os.path.join(folder, STAGING_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and same_process(marker) else None


def find(output_dir: str, keep_last_checkpoint: bool = False, state_dir: Optional[str] = None) -> list[Item]:
    """Everything `cleanup` would remove, without removing anything."""
    from spark_tuning.paths import OWNER_MARKER, local_path, output_root, removal_problem, run_folder

    out = local_path(output_dir)
    root = output_root(output_dir)
    if not os.path.isdir(out) and not os.path.isdir(root):
        raise InputError(f"--output-dir {output_dir}: neither it nor its parent folder exists")
    found: list[tuple[str, str]] = []
    staging = os.path.join(root, ".staging")
    live_partials = set()
    for name in sorted(os.listdir(staging) if os.path.isdir(staging) else []):
        path = os.path.join(staging, name)
        if not (STAGING_NAME.match(name) and os.path.isfile(os.path.join(path, STAGING_MARKER))):
            continue
        marker = live_marker(path)
        if marker:
            live_partials.add(marker.get("partial"))
        else:
            found.append((path, "staging"))
    base = re.escape(os.path.basename(out.rstrip("/")))
    sibling = re.compile(rf"^\.{base}\.(partial|old)-[0-9a-f]{{8}}$")
    for name in sorted(os.listdir(root) if os.path.isdir(root) else []):
        path = os.path.join(root, name)
        if sibling.match(name) and os.path.isdir(path) and path not in live_partials:
            found.append((path, "partial"))
    run = run_folder(out)
    if os.path.isfile(os.path.join(run, "run.json")) and not live_lock(out):
        if keep_last_checkpoint:
            found += _checkpoints(run, keep_last_checkpoint)
        else:
            found.append((run, "run"))
    if os.path.isdir(out) and any(os.path.exists(os.path.join(out, m)) for m in ("run.json", OWNER_MARKER)):
        found += _checkpoints(out, keep_last_checkpoint)  # a finished model's kept checkpoint, an old layout's
    found += _dead_servers(state_dir)
    seen, items = set(), []
    for path, kind in found:
        if removal_problem(path):  # never the working directory, home, the checkout, or a folder holding one
            continue
        if path not in seen and os.path.lexists(path):
            seen.add(path)
            items.append(Item(path, kind, size_of(path)))
    return items


def _checkpoints(folder: str, keep_last: bool) -> list[tuple[str, str]]:
    ckpt_dir = os.path.join(folder, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    checkpoints = sorted((os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if CHECKPOINT_NAME.match(n)),
                         key=_step)
    complete = [c for c in checkpoints if os.path.basename(c).startswith("step-")]
    if keep_last and complete:
        checkpoints.remove(complete[-1])
        best = _best_step(complete[-1])  # train.keep_best: the resumed run ends with the best one's weights
        checkpoints = [c for c in checkpoints if best is None or _step(c) != best or c not in complete]
    return [(p, "checkpoint") for p in checkpoints]


def _best_step(checkpoint: str) -> Optional[int]:
    """The step of the best checkpoint so far that `checkpoint`'s trainer state refers to (train.keep_best)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            best = json.load(f).get("best_step")
    except (OSError, ValueError, AttributeError):
        return None
    return best if isinstance(best, int) else None


def live_lock(out: str) -> Optional[dict]:
    """The lock beside `out` when the run that took it is still going, else None."""
    from spark_tuning.deploy.serving import same_process
    from spark_tuning.paths import lock_file

    try:
        with open(lock_file(out)) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and same_process(holder) else None


def _dead_servers(state_dir: Optional[str]) -> list[tuple[str, str]]:
    """State and log files of recorded servers whose process is gone, or whose pid now belongs to another
    process. (A record without the process's identity, from an older version, counts as live while its pid
    runs: cleanup only deletes files, and keeps them where it cannot tell.)"""
    from spark_tuning.deploy.serving import default_state_dir, process_identity

    servers = state_dir or default_state_dir()
    if not os.path.isdir(servers):
        return []
    live = set()
    for name in os.listdir(servers):
        if not re.match(r"^server-\d+\.json$", name):
            continue
        try:
            with open(os.path.join(servers, name)) as f:
                record = json.load(f)
            start, cmdline = process_identity(int(record["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        recorded = record.get("process_start")
        if start is not None and (recorded is None or (start, cmdline) == (recorded, record.get("cmdline"))):
            live.add(name[:-len(".json")])
    return [(os.path.join(servers, n), "server") for n in sorted(os.listdir(servers))
            if re.match(r"^server-\d+\.(json|log)$", n) and n.rsplit(".", 1)[0] not in live]


def remove(items: list[Item]) -> int:
    """Remove `items`; returns the bytes freed."""
    freed = 0
    for item in items:
        if os.path.isdir(item.path) and not os.path.islink(item.path):
            shutil.rmtree(item.path, ignore_errors=True)
        else:
            try:
                os.remove(item.path)
            except FileNotFoundError:
                continue
        if not os.path.lexists(item.path):
            freed += item.bytes
    return freed


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def render(items: list[Item], freed: Optional[int]) -> str:
    if not items:
        return "nothing to clean up"
    lines = [f"{'would remove' if freed is None else 'removed'} {item.kind:<10} {human(item.bytes):>9}  {item.path}"
             for item in items]
    total = sum(i.bytes for i in items)
    lines.append(f"{len(items)} item(s), {human(total)} " + ("would be freed (dry run)" if freed is None
                                                             else f"freed ({human(freed)} actually removed)"))
    return "\n".join(lines)
