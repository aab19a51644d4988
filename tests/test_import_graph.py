"""The import graph of automix_fast: no cycles, and no project imports hidden in functions.

Every module of the package is parsed with `ast` (nothing is imported). Each `import` and
`from ... import` of an automix_fast module, at top level or inside a function, is an edge;
relative imports are resolved, and `from pkg import name` is an edge to `pkg.name` when that
is a submodule, else to `pkg`. Importing `a.b.c` runs the `__init__` of `a.b` as well, so an
import also counts as an edge to every package on the way that the importer is not itself
inside: `kernels -> ops.launches` is a cycle with `ops -> kernels` even though it never
names `ops`.

Imports inside functions are kept for dependencies that are optional or slow to import (see
LAZY). A project module may be imported inside a function only when it imports one of
those at top level (directly or through another project module): importing it there is
importing the heavy dependency.
"""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import automix_fast

PACKAGE = Path(automix_fast.__file__).resolve().parent
ROOT_NAME = "automix_fast"

# Third-party modules that are optional or heavy: the only imports allowed inside functions.
LAZY = (
    "triton",  # Linux-only; its import is slow and, with TRITON_INTERPRET, mode-setting
    "nvidia.dali",  # optional extra (--loader dali)
    "torch.utils.tensorboard",  # optional extra (--log-tensorboard)
    "tensorboard",
)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_project(name: str) -> bool:
    return name == ROOT_NAME or name.startswith(ROOT_NAME + ".")


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class Import:
    """One import statement's project targets, where it is, and whether it is in a function."""

    def __init__(self, importer: str, targets: list[str], line: int, in_function: bool, third_party: list[str]):
        self.importer, self.targets, self.line = importer, targets, line
        self.in_function, self.third_party = in_function, third_party


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
                found.append(Import(name, [n for n in names if _is_project(n)], child.lineno, in_function,
                                    [n for n in names if not _is_project(n)]))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(name, is_package, child.module, child.level)
                if _is_project(base):
                    subs = (f"{base}.{alias.name}" for alias in child.names)
                    targets = list(dict.fromkeys(sub if sub in modules else base for sub in subs))
                    found.append(Import(name, targets, child.lineno, in_function, []))
                else:
                    found.append(Import(name, [], child.lineno, in_function, [base]))
            visit(child, inner)

    visit(tree, False)
    return found


def edges_of(importer: str, target: str) -> set[str]:
    """The modules whose code runs when `importer` imports `target` (packages on the way too)."""
    inside = set(_ancestors(importer)) | {importer}
    return {m for m in _ancestors(target) + [target] if m not in inside}


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, list[Import]]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    imports = {m: imports_of(m, p, modules) for m, p in modules.items()}
    for m, found in imports.items():
        for imp in found:
            for target in imp.targets:
                graph[m] |= {t for t in edges_of(m, target) if t in modules and t != m}
    return graph, imports


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Every elementary cycle, each as its chain from its smallest module (a, b, a)."""
    found: list[tuple[str, ...]] = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append(tuple(path) + (start,))
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return sorted(set(found))


def heavy_modules(imports: dict[str, list[Import]]) -> set[str]:
    """Project modules whose top-level imports (transitively) pull in a LAZY dependency."""
    def lazy(name: str) -> bool:
        return any(name == d or name.startswith(d + ".") for d in LAZY)

    heavy = {m for m, found in imports.items()
             if any(lazy(t) for imp in found if not imp.in_function for t in imp.third_party)}
    changed = True
    while changed:
        changed = False
        for m, found in imports.items():
            if m not in heavy and any(t in heavy for imp in found if not imp.in_function for t in imp.targets):
                heavy.add(m)
                changed = True
    return heavy


def in_function_project_imports(imports: dict[str, list[Import]]) -> list[tuple[str, str, int]]:
    """(importer, project module, line) for each project import inside a function that is
    not of a heavy module."""
    heavy = heavy_modules(imports)
    return [(m, t, imp.line) for m, found in imports.items() for imp in found if imp.in_function
            for t in imp.targets if t not in heavy]


def test_resolution_rules(tmp_path):
    modules = {"automix_fast.ops": Path("x"), "automix_fast.ops.launches": Path("x"),
               "automix_fast.kernels": Path("x"), "automix_fast.kernels.mask_mix": Path("x")}
    assert _resolve("automix_fast.kernels.mask_mix", False, "ops", 2) == "automix_fast.ops"
    assert _resolve("automix_fast.ops", True, None, 1) == "automix_fast.ops"
    assert edges_of("automix_fast.kernels.mask_mix", "automix_fast.ops.launches") == {
        "automix_fast.ops", "automix_fast.ops.launches"}
    assert edges_of("automix_fast.ops.reference", "automix_fast.ops.launches") == {"automix_fast.ops.launches"}
    src = tmp_path / "automix_fast" / "ops" / "__init__.py"
    src.parent.mkdir(parents=True)
    src.write_text("from . import launches, missing\n"
                   "def f():\n    from ..kernels.mask_mix import mask_mix\n    import triton\n")
    found = imports_of("automix_fast.ops", src, modules)
    assert [(i.targets, i.in_function, i.third_party) for i in found] == [
        (["automix_fast.ops.launches", "automix_fast.ops"], False, []),
        (["automix_fast.kernels.mask_mix"], True, []),
        ([], True, ["triton"])]
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"c"}}) == [("a", "b", "a"), ("c", "c")]


def test_no_import_cycles():
    graph, _ = import_graph(project_modules())
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_imports_inside_functions_are_heavy_dependencies_only():
    _, imports = import_graph(project_modules())
    found = sorted(f"{m}:{line} imports {t} inside a function" for m, t, line in in_function_project_imports(imports))
    assert not found, "project imports inside functions (move them to the top of the file):\n" + "\n".join(found)


if __name__ == "__main__":  # the current state: cycles and in-function project imports
    graph, imports = import_graph(project_modules())
    found_cycles = cycles(graph)
    print(f"# {len(found_cycles)} cycles")
    for c in found_cycles:
        print(f"    {c!r},")
    counts = Counter(f"{m} -> {t}" for m, t, _ in in_function_project_imports(imports))
    print(f"# {sum(counts.values())} in-function project imports")
    for key in sorted(counts):
        print(f'    "{key}": {counts[key]},')
