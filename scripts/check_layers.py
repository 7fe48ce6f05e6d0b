"""Fail on an import that points up the layer diagram, or on an import cycle, inside the reforge package.

The layers (shared/docs/STYLE.md), highest first; a module may import its own layer and the layers below:

    cli            reforge.cli, reforge.__main__
    recipe         reforge.recipe (runs every step of a recipe file, tune and push included)
    publish        reforge.publish
    tune           reforge.tune
    ops train eval reforge.ops, reforge.train, reforge.eval
    profiles data  reforge.profiles, reforge.data, reforge.dist, reforge.card
    io             reforge.io
    errors         reforge.errors

One deviation from STYLE.md's sketch, on purpose: ``reforge.card`` renders a model card from a dict (no I/O, no Hub
calls), and `merge` writes it into every output, so it sits beside profiles rather than in publish.

The floor's three packages are siblings: ops, train and eval may not import each other (what two of them need lives
a layer below; what composes them, such as tune or a command, sits above). ``SIDEWAYS`` lists the exceptions still
to clear, each with its reason.

Only reforge.io touches checkpoint files: outside it, no module imports ``safetensors``, calls ``torch.save`` or
``torch.load``, or reads a checkpoint's own JSON (``CHECKPOINT_JSON``: opened, read or parsed; an existence test is
free). ``IO_EXCEPTIONS`` lists the exceptions still to clear.

Every import counts, also one inside a function, ``importlib.import_module("reforge...")`` or ``__import__`` with a
literal name, and ``import reforge`` followed by ``reforge.tune(...)``: a lazy import is still a dependency.
``from reforge.io import reader`` is an import of the submodule ``reforge.io.reader`` (so a cycle through it is seen).
``from reforge import __version__`` is free; ``from reforge import diff`` counts as an import of the module the
package's ``_API`` table names. A computed name (``import_module(name)``) cannot be checked: it is an error unless
``COMPUTED`` lists it with the reason it is safe. A new top-level module must be given a layer below.

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
    "reforge.recipe": 6,  # runs tune and push steps: above publish, below the CLI
    "reforge.card": 2,  # text only; merge (ops) writes the card, publish uploads it
    "reforge.cli": 7,
    "reforge.__main__": 7,
}
ROOT = "reforge"
# Libraries that open checkpoint files: only reforge.io may import them (STYLE.md: "only io touches checkpoints").
IO_ONLY = ("safetensors",)
# torch's own checkpoint functions: only reforge.io may call them.
TORCH_IO = ("save", "load")
# A checkpoint folder's own JSON files: only reforge.io may open, read or parse them.
CHECKPOINT_JSON = ("adapter_config.json", "model.safetensors.index.json", "reforge.json")
FREE_ROOT_NAMES = {"__version__", "__all__"}
DEFAULT_PACKAGE = Path(__file__).resolve().parents[1] / ROOT
# The floor: siblings that may not import each other.
FLOOR = ("reforge.ops", "reforge.train", "reforge.eval")

# Exceptions, each with its reason; the lead clears them (a stale entry is reported, so the list only shrinks).
# (importing module, imported module) -> reason
SIDEWAYS: dict[tuple[str, str], str] = {}
# (module, what) -> reason; what is "torch.save", "torch.load", or a CHECKPOINT_JSON name
IO_EXCEPTIONS: dict[tuple[str, str], str] = {}
# (module, the computed name as written) -> why it is safe
COMPUTED: dict[tuple[str, str], str] = {
    ("reforge", "_API[name]"): "the lazy public API; its modules are the _API table, which this check reads",
    ("reforge.cli", "module"): "the lazy command group; COMMANDS names only reforge.cli modules (layer cli)",
}


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
    """``(imported reforge module, line)`` for every import in a module's syntax tree.

    A name that is not a module (``from reforge.io.reader import ShardReader``, ``reforge.tune``) is given as
    written; `_existing` trims it to the module that holds it.
    """
    found, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    found.append((alias.name, node.lineno))
                    # ``import reforge.io.reader`` binds ``reforge``; ``import reforge.io as rio`` binds ``rio``
                    bound[alias.asname or ROOT] = alias.name if alias.asname else ROOT
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            if base == ROOT:
                for alias in node.names:
                    if alias.name not in FREE_ROOT_NAMES:
                        found.append((api.get(alias.name, f"{ROOT}.{alias.name}"), node.lineno))
            elif _ours(base):
                found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
                found += [(base, node.lineno)] if any(alias.name == "*" for alias in node.names) else []
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                if _ours(first.value):
                    found.append((first.value, node.lineno))
    found += _attribute_uses(tree, bound, api)
    return found


def computed_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """``(the name's source text, line)`` for every ``import_module(x)`` / ``__import__(x)`` whose ``x`` is not a
    string literal: what it imports cannot be known without running it."""
    return [
        (ast.unparse(node.args[0]), node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and _is_import_call(node.func)
        and node.args
        and not (isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))
    ]


def _attribute_uses(tree: ast.AST, bound: dict[str, str], api: dict[str, str]) -> list[tuple[str, int]]:
    """``reforge.tune(...)`` after ``import reforge``: each longest attribute chain on a name an import bound."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Attribute):
            chain, inner = [], node
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in bound:
                dotted = [bound[inner.id], *reversed(chain)]
                if dotted[0] == ROOT and len(dotted) > 1:
                    if dotted[1] in FREE_ROOT_NAMES:
                        return
                    if dotted[1] in api:
                        dotted = [api[dotted[1]]]
                found.append((".".join(dotted), node.lineno))
                return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def check(package_dir: Path) -> tuple[list[str], int]:
    """All problems found under ``package_dir`` (a ``reforge`` folder), and the number of edges checked."""
    modules = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    api = _api_table(package_dir / "__init__.py")
    problems, graph, edges, used = [], {name: set() for name in modules}, 0, set()
    for name, path in modules.items():
        source_layer = layer_of(name)
        if source_layer is None and name != ROOT:
            problems.append(f"{path}: module {name} has no layer; add it to LAYERS in scripts/check_layers.py")
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        problems += _io_only(tree, name, path, used)
        for text, line in computed_imports(tree):
            if (name, text) in COMPUTED:
                used.add(("computed", name, text))
            else:
                problems.append(
                    f"{path}:{line}: {name} imports a computed name ({text}), which this check cannot follow; "
                    "import the module by name, or add it to COMPUTED with the reason it is safe"
                )
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
            elif _sideways(name, target):
                if (name, target) in SIDEWAYS:
                    used.add(("sideways", name, target))
                else:
                    problems.append(
                        f"{path}:{line}: {name} imports {target}: ops, train and eval may not import each other; "
                        "move what both need a layer down, or compose them above"
                    )
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    if package_dir.resolve() == DEFAULT_PACKAGE:  # a stale exception is only knowable for the real package
        problems += _stale(used)
    return problems, edges


def _sideways(source: str, target: str) -> bool:
    """Whether ``source`` and ``target`` sit in two different packages of the floor."""
    a = next((f for f in FLOOR if source == f or source.startswith(f + ".")), None)
    b = next((f for f in FLOOR if target == f or target.startswith(f + ".")), None)
    return a is not None and b is not None and a != b


def _stale(used: set[tuple[str, ...]]) -> list[str]:
    listed = [("sideways", *k) for k in SIDEWAYS] + [("io", *k) for k in IO_EXCEPTIONS]
    listed += [("computed", *k) for k in COMPUTED]
    return [
        f"scripts/check_layers.py: the exception {kind} {source} -> {what} is no longer needed; remove it"
        for kind, source, what in listed
        if (kind, source, what) not in used
    ]


def _io_only(tree: ast.AST, module: str, path: Path, used: set[tuple[str, ...]]) -> list[str]:
    """Checkpoint access outside reforge.io: a checkpoint library (``IO_ONLY``) imported, ``torch.save`` or
    ``torch.load`` called, a checkpoint JSON file (``CHECKPOINT_JSON``) opened or read."""
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
    for what, line in _checkpoint_access(tree):
        if (module, what) in IO_EXCEPTIONS:
            used.add(("io", module, what))
        else:
            found.append(f"{path}:{line}: {module} uses {what}; only reforge.io reads or writes checkpoint files")
    return found


def _checkpoint_access(tree: ast.AST) -> list[tuple[str, int]]:
    """``(torch.save | torch.load | a CHECKPOINT_JSON name, line)`` for each use of one.

    ``torch.load(...)``, ``from torch import load``; ``open(x)``, ``x.open()``, ``x.read_text()``, ``x.read_bytes()``,
    ``json.load(x)`` where ``x`` holds a checkpoint JSON name, directly or through a name assigned from it.
    """
    torch_names = {"torch"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torch_names |= {a.asname for a in node.names if a.name == "torch" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and not node.level:
            found += [(f"torch.{a.name}", node.lineno) for a in node.names if a.name in TORCH_IO]
    holders = {
        target.id: name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None
        for name in [_json_name(node.value, {})]
        if name
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in torch_names:
            if func.attr in TORCH_IO:
                found.append((f"torch.{func.attr}", node.lineno))
                continue
        read = None
        if isinstance(func, ast.Attribute) and func.attr in ("open", "read_text", "read_bytes"):
            read = _json_name(func.value, holders)
        if (
            read is None
            and node.args
            and (
                (isinstance(func, ast.Name) and func.id == "open")
                or (isinstance(func, ast.Attribute) and func.attr == "load")
            )
        ):
            read = _json_name(node.args[0], holders)
        if read:
            found.append((read, node.lineno))
    return sorted(found, key=lambda item: item[1])


def _json_name(node: ast.AST, holders: dict[str, str]) -> str | None:
    """The checkpoint JSON name an expression spells or holds (through a name in ``holders``), or None."""
    for inner in ast.walk(node):
        if isinstance(inner, ast.Constant) and isinstance(inner.value, str) and inner.value in CHECKPOINT_JSON:
            return inner.value
        if isinstance(inner, ast.Name) and inner.id in holders:
            return holders[inner.id]
    return None


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


def _is_import_call(func: ast.expr) -> bool:
    """``import_module(...)``, ``importlib.import_module(...)``, ``__import__(...)``, ``importlib.__import__(...)``."""
    names = ("import_module", "__import__")
    return (isinstance(func, ast.Name) and func.id in names) or (isinstance(func, ast.Attribute) and func.attr in names)


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
    package_dir = Path(argv[1]) if len(argv) > 1 else DEFAULT_PACKAGE
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
