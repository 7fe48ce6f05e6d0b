"""The import-layer check of `make lint`, and the dependencies the package metadata promises."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layers():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def package(tmp_path):
    target = tmp_path / "reforge"
    shutil.copytree(ROOT / "reforge", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_the_package_has_no_upward_import_and_no_cycle(layers):
    problems, edges = layers.check(ROOT / "reforge")
    assert problems == [] and edges > 100


def test_an_upward_import_is_caught_even_inside_a_function(layers, package):
    index = package / "io" / "index.py"
    index.write_text(index.read_text() + "\n\ndef _late():\n    from reforge.ops.merge import merge  # noqa\n")
    problems, _ = layers.check(package)
    assert len(problems) >= 1
    assert re.search(r"io/index\.py:\d+: reforge\.io\.index \(layer io\) imports reforge\.ops\.merge", problems[0])
    assert any(p.startswith("import cycle: ") for p in problems)  # ops.merge imports io.index back


def test_a_cycle_inside_one_layer_and_a_dynamic_import_are_caught(layers, package):
    fmt = package / "io" / "format.py"  # reader imports format; now format imports reader back
    fmt.write_text(fmt.read_text() + "\nimport importlib\nimportlib.import_module('reforge.io.reader')\n")
    problems, _ = layers.check(package)
    assert problems and all(p.startswith("import cycle: ") for p in problems)
    assert "reforge.io.format" in problems[0] and "reforge.io.reader" in problems[0]


def test_a_module_without_a_layer_is_reported(layers, package):
    (package / "helpers.py").write_text("X = 1\n")
    problems, _ = layers.check(package)
    assert problems == [
        f"{package / 'helpers.py'}: module reforge.helpers has no layer; add it to LAYERS in scripts/check_layers.py"
    ]


def test_every_third_party_module_reforge_imports_is_a_declared_dependency():
    """Case 7: hub code imported httpx2 while the metadata promised only huggingface_hub>=0.26."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    owners = packages_distributions()
    undeclared = {}
    for path in sorted((ROOT / "reforge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "reforge" or top in sys.stdlib_module_names:
                    continue
                dists = {_name(d) for d in owners.get(top, [top])}
                if not dists & declared:
                    undeclared.setdefault(top, str(path.relative_to(ROOT)))
    assert undeclared == {}
    hub_floor = next(r for r in project["dependencies"] if _name(r) == "huggingface-hub")
    assert re.search(r">=\s*2", hub_floor), "huggingface_hub depends on httpx2 only from 2.0 on"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_a_checkpoint_library_outside_io_is_caught(layers, package):
    model = package / "eval" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _late():\n    from safetensors.torch import load_file  # noqa\n")
    problems, _ = layers.check(package)
    assert len(problems) == 1 and "reforge.eval.model imports safetensors.torch; only reforge.io" in problems[0]
