"""Fail on an import that points up the layer diagram, or on an import cycle, inside the reforge package.

The layers (shared/docs/STYLE.md), highest first; a module may import its own layer and the layers below:

    cli            reforge.cli, reforge.__main__
    publish        reforge.publish
    tune           reforge.tune
    ops train eval reforge.ops, reforge.train, reforge.eval
    profiles data  reforge.profiles, reforge.data, reforge.dist, reforge.card
    io             reforge.io
    errors         reforge.errors

One deviation from STYLE.md's sketch, on purpose: ``reforge.card`` renders a model card from a dict (no I/O, no Hub
calls), and `merge` writes it into every output, so it sits beside profiles rather than in publish.

Only reforge.io may import ``safetensors`` (the one package that opens, parses or writes checkpoint files).

Every import counts, also one inside a function and ``importlib.import_module("reforge...")`` with a literal name:
a lazy import is still a dependency. ``from reforge import __version__`` is free; ``from reforge import diff`` counts
as an import of the module the package's ``_API`` table names. A new top-level module must be given a layer below.

    python scripts/check_layers.py [PACKAGE_DIR]      # exit 1 and one line per problem, or 0 and a summary
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS: dict[str, int] = {
    "reforge.errors": 0,
    "reforge.io": 1,
    "reforge.profiles": 2,
    "reforge.data": 2,
    "reforge.dist": 2,
    "reforge.ops": 3,
    "reforge.train": 3,
    "reforge.eval": 3,
    "reforge.queries": 3,  # loads an LM to write queries; reads data, writes a BEIR folder
    "reforge.tune": 4,
    "reforge.publish": 5,
    "reforge.card": 2,  # text only; merge (ops) writes the card, publish uploads it
    "reforge.cli": 6,
    "reforge.__main__": 6,
}
ROOT = "reforge"
# Libraries that open checkpoint files: only reforge.io may import them (STYLE.md: "only io touches checkpoints").
IO_ONLY = ("safetensors",)
FREE_ROOT_NAMES = {"__version__", "__all__"}


def module_name(path: Path, package_dir: Path) -> str:
    """``reforge/io/index.py`` -> ``reforge.io.index``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer of a module: the entry of its longest listed prefix (None for the package root)."""
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def imports_of(tree: ast.AST, module: str, is_package: bool, api: dict[str, str]) -> list[tuple[str, int]]:
    """``(imported reforge module, line)`` for every import in a module's syntax tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if _ours(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            if base == ROOT:
                for alias in node.names:
                    if alias.name not in FREE_ROOT_NAMES:
                        found.append((api.get(alias.name, f"{ROOT}.{alias.name}"), node.lineno))
            elif _ours(base):
                found.append((base, node.lineno))
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and _ours(first.value):
                found.append((first.value, node.lineno))
    return found


def check(package_dir: Path) -> tuple[list[str], int]:
    """All problems found under ``package_dir`` (a ``reforge`` folder), and the number of edges checked."""
    modules = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    api = _api_table(package_dir / "__init__.py")
    problems, graph, edges = [], {name: set() for name in modules}, 0
    for name, path in modules.items():
        source_layer = layer_of(name)
        if source_layer is None and name != ROOT:
            problems.append(f"{path}: module {name} has no layer; add it to LAYERS in scripts/check_layers.py")
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        problems += _io_only(tree, name, path)
        for target, line in imports_of(tree, name, path.name == "__init__.py", api):
            target = _existing(target, modules)
            edges += 1
            if target != name:
                graph[name].add(target)
            target_layer = layer_of(target)
            if source_layer is not None and target_layer is not None and target_layer > source_layer:
                problems.append(
                    f"{path}:{line}: {name} (layer {_layer_name(source_layer)}) imports {target} "
                    f"(layer {_layer_name(target_layer)}), which is above it"
                )
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems, edges


def _io_only(tree: ast.AST, module: str, path: Path) -> list[str]:
    """Imports of a checkpoint-file library (``IO_ONLY``) outside reforge.io."""
    if module == "reforge.io" or module.startswith("reforge.io."):
        return []
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        found += [
            f"{path}:{node.lineno}: {module} imports {n}; only reforge.io reads or writes checkpoint files"
            for n in names
            if n.split(".")[0] in IO_ONLY
        ]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) for each strongly connected group of modules."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path_in(group, graph) for group in groups]


def _path_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    start = min(group)
    path, seen, node = [start], {start}, start
    while True:
        nxt = min(n for n in graph[node] if n in group)
        path.append(nxt)
        if nxt in seen:
            return path[path.index(nxt) :]
        seen.add(nxt)
        node = nxt


def _ours(name: str | None) -> bool:
    return bool(name) and (name == ROOT or name.startswith(ROOT + "."))


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    if not node.level:
        return node.module
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    base = ".".join(parts[:keep])
    return f"{base}.{node.module}" if node.module else base


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id == "import_module") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )


def _existing(target: str, modules: dict[str, Path]) -> str:
    """The module an import refers to: ``from reforge.io import index`` names a submodule, not a package."""
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _api_table(init: Path) -> dict[str, str]:
    """The package root's lazy ``_API`` table: public name -> module."""
    if not init.is_file():
        return {}
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_API" for t in node.targets):
            try:
                return dict(ast.literal_eval(node.value))
            except ValueError:
                return {}
    return {}


def _layer_name(layer: int) -> str:
    return "/".join(p.removeprefix(ROOT + ".") for p, v in LAYERS.items() if v == layer)


def main(argv: list[str]) -> int:
    package_dir = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1] / ROOT)
    problems, edges = check(package_dir)
    for problem in problems:
        print(problem)
    if problems:
        print(f"check_layers: {len(problems)} problem(s); layers and rules: scripts/check_layers.py docstring")
        return 1
    print(f"check_layers: {edges} imports checked, no upward import, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
