"""`spark-tuning cleanup`: remove what a run leaves behind that is not the model.

Removed (beside or inside the output folder):
  staging     tokenized data staged for training: `<output root>/.staging/*`
  petastorm   petastorm cache folders (`*petastorm*` in the output root or its staging folder)
  partial     half-written or replaced outputs of interrupted runs: `<root>/.<name>.partial-*`, `.old-*`
  checkpoint  intermediate checkpoints: `<output>/checkpoints/*` or `<output>/checkpoint-*`
              (with keep_last_checkpoint, the one with the highest step stays)
  server      state and log files of model servers that are no longer running
Never removed: the final model (config, weights, tokenizer), metrics, the MLflow store and artifacts.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from spark_tuning.errors import InputError


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
    m = re.search(r"(\d+)$", os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else -1


def find(output_dir: str, keep_last_checkpoint: bool = False, state_dir: Optional[str] = None) -> list[Item]:
    """Everything `cleanup` would remove, without removing anything."""
    from spark_tuning.paths import local_path, output_root
    from spark_tuning.deploy.serving import default_state_dir, process_alive

    out = local_path(output_dir)
    root = output_root(output_dir)
    if not os.path.isdir(out) and not os.path.isdir(root):
        raise InputError(f"--output-dir {output_dir}: neither it nor its parent folder exists")
    found: list[tuple[str, str]] = []
    staging = os.path.join(root, ".staging")
    for path in sorted(os.path.join(staging, n) for n in (os.listdir(staging) if os.path.isdir(staging) else [])):
        found.append((path, "petastorm" if "petastorm" in os.path.basename(path).lower() else "staging"))
    for path in sorted(glob.glob(os.path.join(root, "*petastorm*")) + glob.glob(os.path.join(root, ".*petastorm*"))):
        found.append((path, "petastorm"))
    name = os.path.basename(out.rstrip("/"))
    for tag in ("partial", "old"):
        found += [(p, "partial") for p in sorted(glob.glob(os.path.join(root, f".{name}.{tag}-*")))]
    checkpoints = sorted(glob.glob(os.path.join(out, "checkpoints", "*")) + glob.glob(os.path.join(out, "checkpoint-*")),
                         key=_step)
    if keep_last_checkpoint and checkpoints:
        checkpoints = checkpoints[:-1]
    found += [(p, "checkpoint") for p in checkpoints]
    servers = state_dir or default_state_dir()
    for state in sorted(glob.glob(os.path.join(servers, "server-*.json"))):
        try:
            with open(state) as f:
                pid = int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pid = -1
        if pid <= 0 or not process_alive(pid):
            found.append((state, "server"))
    live_logs = {p[:-len(".json")] + ".log" for p in glob.glob(os.path.join(servers, "server-*.json"))
                 if (p, "server") not in found}
    found += [(p, "server") for p in sorted(glob.glob(os.path.join(servers, "server-*.log"))) if p not in live_logs]
    from spark_tuning.paths import removal_problem

    seen, items = set(), []
    for path, kind in found:
        if removal_problem(path):  # never the working directory, home, the checkout, or a folder holding one
            continue
        if path not in seen and os.path.lexists(path):
            seen.add(path)
            items.append(Item(path, kind, size_of(path)))
    return items


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
