"""The package's shape, kept honest with `ast` (no dependency): no import cycle inside spark_tuning (imports
inside functions count: they run too), no function longer than 80 lines, and no branch on the task's name
outside spark_tuning/tasks/. `python tests/test_structure.py` prints the figures."""

from __future__ import annotations

import ast
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "spark_tuning")
MAX_FUNCTION_LINES = 80
TASK_NAMES = {"classification", "multilabel_classification", "regression", "token_classification", "causal_lm", "sft"}
# Logged with the model as code and run where spark_tuning is not installed: it cannot ask tasks/ and
# picks its class from the model's own config (see its docstring).
SELF_CONTAINED = {"spark_tuning.deploy.serving_model"}


def modules() -> dict[str, str]:
    """Dotted module name -> path, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _parse(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                lines.add(getattr(inner, "lineno", -1))
    return lines


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The package modules `name` imports, anywhere in the file (module level or inside functions)."""
    tree = _parse(path)
    skip = _type_checking_only(tree)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            # `from spark_tuning.x import y`: y may be a module (spark_tuning.x.y) or a name in x.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("spark_tuning."):
                out.add(target)
    return out


def import_cycles() -> list[list[str]]:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for name, path in modules().items():
        for node in ast.walk(_parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out.append(f"{name}.{node.name} ({length} lines)")
    return out


def _names_a_task(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_task(e) for e in node.elts)
    return False


def task_branches() -> list[str]:
    """Comparisons with a task's name (`cfg.task == "sft"`, `task in ("causal_lm", "sft")`) and dict
    lookups keyed by one, outside tasks/ and the self-contained serving model."""
    out = []
    for name, path in modules().items():
        if name.startswith("spark_tuning.tasks") or name in SELF_CONTAINED:
            continue
        for node in ast.walk(_parse(path)):
            hit: Optional[ast.AST] = None
            if isinstance(node, ast.Compare) and any(_names_a_task(x) for x in [node.left, *node.comparators]):
                hit = node
            elif isinstance(node, ast.Dict) and any(k is not None and _names_a_task(k) for k in node.keys):
                hit = node
            if hit is not None:
                out.append(f"{os.path.relpath(path, ROOT)}:{hit.lineno}: {ast.unparse(hit)[:70]}")
    return out


def figures() -> dict:
    mods = modules()
    lines = sum(sum(1 for _ in open(p, encoding="utf-8")) for p in mods.values())
    longest = sorted(((n.end_lineno - n.lineno + 1, f"{m}.{n.name}") for m, p in mods.items()
                      for n in ast.walk(_parse(p)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                     reverse=True)[:4]
    branches = task_branches()
    return {"modules": len(mods), "lines": lines, "import_cycles": import_cycles(),
            "functions_over_80_lines": long_functions(), "longest": longest,
            "task_branches_outside_tasks": len(branches),
            "modules_branching_on_task": len({b.split(":")[0] for b in branches})}


def test_no_import_cycle_inside_the_package():
    assert import_cycles() == []


def test_no_function_is_longer_than_80_lines():
    assert long_functions() == []


def test_only_tasks_branch_on_the_task_name():
    assert task_branches() == []


def test_the_checks_see_what_they_should(tmp_path):
    """The checkers themselves: a cycle, a long function and a task branch in a scratch package are found."""
    global PACKAGE, ROOT
    pkg = tmp_path / "spark_tuning"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from spark_tuning import b\n")
    (pkg / "b.py").write_text("from spark_tuning.a import f\n\ndef g(cfg):\n    return cfg.task == 'sft'\n"
                              + "def h():\n" + "    x = 1\n" * 85)
    (pkg / "tasks" / "sft.py").write_text("def own(cfg):\n    return cfg.task == 'sft'\n")
    saved = PACKAGE, ROOT
    PACKAGE, ROOT = str(pkg), str(tmp_path)
    try:
        assert import_cycles() and set(import_cycles()[0]) == {"spark_tuning.a", "spark_tuning.b"}
        assert long_functions() == ["spark_tuning.b.h (86 lines)"]
        assert [b.split(":")[0] for b in task_branches()] == [os.path.join("spark_tuning", "b.py")]
    finally:
        PACKAGE, ROOT = saved


if __name__ == "__main__":
    for key, value in figures().items():
        print(f"{key}: {value}", file=sys.stdout)
