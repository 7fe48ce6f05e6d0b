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


# The layer check's holes (issue 23): each test builds a tiny fake package the check must reject.

FAKE = {
    "__init__.py": "import importlib\n\n_API = {'tune': 'reforge.tune', 'merge': 'reforge.ops.merge'}\n\n\n"
    "def __getattr__(name):\n    return getattr(importlib.import_module(_API[name]), name)\n",
    "errors.py": "",
    "io/__init__.py": "",
    "io/format.py": "X = 1\n",
    "io/reader.py": "from reforge.io.format import X  # noqa\n",
    "ops/__init__.py": "",
    "ops/merge.py": "from reforge.io.reader import X  # noqa\n",
    "ops/fold.py": "",
    "eval/__init__.py": "",
    "eval/encode.py": "",
    "train/__init__.py": "",
    "train/loop.py": "",
    "tune.py": "from reforge.ops import merge  # noqa\n",
}


@pytest.fixture
def fake(tmp_path):
    """A tiny package with reforge's layers and no problem; a test adds one file with one hole."""
    root = tmp_path / "reforge"
    for name, text in FAKE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)

    def with_file(name: str, text: str) -> Path:
        (root / name).write_text(text)
        return root

    return with_file


def test_the_fake_package_alone_passes(layers, fake):
    assert layers.check(fake("errors.py", ""))[0] == []


def test_an_attribute_of_an_imported_reforge_is_an_import(layers, fake):
    package = fake("io/format.py", "import reforge\n\n\ndef late():\n    return reforge.tune.run(), reforge.merge()\n")
    problems, _ = layers.check(package)
    assert [p.split(": ", 1)[1] for p in problems[:2]] == [
        "reforge.io.format (layer io) imports reforge.tune (layer tune), which is above it",
        f"reforge.io.format (layer io) imports reforge.ops.merge (layer {layers._layer_name(3)}), which is above it",
    ]
    assert layers._layer_name(3).startswith("ops/train/eval")  # the floor's name, whatever joins it


def test_a_submodule_imported_from_its_package_is_recorded_so_its_cycle_is_seen(layers, fake):
    package = fake("io/format.py", "from reforge.io import reader  # noqa\n")  # reader imports format
    assert layers.check(package)[0] == ["import cycle: reforge.io.format -> reforge.io.reader -> reforge.io.format"]


def test_a_computed_import_is_unverifiable_unless_listed_with_a_reason(layers, fake):
    package = fake(
        "ops/fold.py",
        "import importlib\n\n\ndef f(x):\n    return importlib.import_module(x), __import__(f'reforge.{x}')\n",
    )
    problems, _ = layers.check(package)
    assert len(problems) == 2 and all("reforge.ops.fold imports a computed name" in p for p in problems)
    assert "(x)" in problems[0] and "(f'reforge.{x}')" in problems[1]
    assert ("reforge", "_API[name]") in layers.COMPUTED  # the fake root's lazy API uses that listed form


def test_ops_train_and_eval_may_not_import_each_other(layers, fake):
    package = fake("ops/fold.py", "def f():\n    from reforge.eval import encode  # noqa\n")
    problems, _ = layers.check(package)
    assert len(problems) == 1
    assert problems[0].endswith(
        "reforge.ops.fold imports reforge.eval.encode: ops, train and eval may not import each "
        "other; move what both need a layer down, or compose them above"
    )


def test_torch_save_and_load_outside_io_are_caught(layers, fake):
    text = "import torch\nfrom torch import load  # noqa\n\n\ndef f(x, p):\n    torch.save(x, p / 'optim.pt')\n"
    problems, _ = layers.check(fake("train/loop.py", text))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "reforge.train.loop uses torch.load; only reforge.io reads or writes checkpoint files",
        "reforge.train.loop uses torch.save; only reforge.io reads or writes checkpoint files",
    ]


def test_reading_adapter_config_json_outside_io_is_caught_but_testing_that_it_exists_is_not(layers, fake):
    text = (
        "import json\n\n\ndef f(folder):\n"
        "    if (folder / 'adapter_config.json').is_file():\n"
        "        return json.loads((folder / 'adapter_config.json').read_text())\n\n\n"
        "def g(folder):\n    path = folder / 'adapter_config.json'\n    with open(path) as h:\n        return h\n"
    )
    problems, _ = layers.check(fake("ops/fold.py", text))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "reforge.ops.fold uses adapter_config.json; only reforge.io reads or writes checkpoint files",
    ] * 2
    assert [p.split(":")[1] for p in problems] == ["6", "11"]


def test_an_exception_no_longer_needed_is_reported_so_the_lists_only_shrink(layers, fake, monkeypatch):
    package = fake("errors.py", "")
    monkeypatch.setattr(layers, "DEFAULT_PACKAGE", package.resolve())
    problems, _ = layers.check(package)
    stale = [p for p in problems if "is no longer needed" in p]
    assert len(stale) == len(layers.SIDEWAYS) + len(layers.IO_EXCEPTIONS) + len(layers.COMPUTED) - 1  # root's used
    for module, what in layers.IO_EXCEPTIONS:  # each entry is reported once the code no longer needs it
        assert f"exception io {module} -> {what} is no longer needed" in "\n".join(stale)


def test_no_module_defines_one_top_level_name_twice():
    """A second top-level ``def``/``class`` silently replaces the first for every caller, even ones written above
    it (ruff's F811 sees only an unused first definition): examples/reproduce.py had two ``_size`` functions, so
    measuring adapter sizes called the table formatter with four arguments."""
    twice = []
    for path in sorted([*ROOT.glob("reforge/**/*.py"), *ROOT.glob("examples/*.py"), *ROOT.glob("bench/*.py")]):
        names = [
            node.name
            for node in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]
        twice += [f"{path.relative_to(ROOT)}: {name}" for name in sorted({n for n in names if names.count(n) > 1})]
    assert twice == []
