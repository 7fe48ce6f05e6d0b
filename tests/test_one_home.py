"""Issue 23, one home per fact: each fact below is kept in one module, and a second copy is caught here.

Each test either checks the shared home's behaviour with real values, or scans the package for a second copy of
the fact (which would drift from the first).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "reforge"


def _sources(exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Every module's source text under reforge/, by path relative to the package, minus ``exclude``."""
    return {
        str(path.relative_to(PACKAGE)): path.read_text(encoding="utf-8")
        for path in sorted(PACKAGE.rglob("*.py"))
        if str(path.relative_to(PACKAGE)) not in exclude
    }


# -- finite checks: reforge.io.tensors.all_finite -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_sees_nan_and_both_infinities_in_every_float_dtype(dtype):
    from reforge.io.tensors import all_finite, first_non_finite

    clean = torch.linspace(-3, 3, 1000, dtype=dtype).reshape(10, 100)
    assert all_finite(clean) and all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.tensor(2.0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = clean.clone()
        broken[7, 42] = bad
        assert not all_finite(broken)
        tensors = [("a.weight", clean), ("b.weight", broken), ("c.weight", broken)]
        assert first_non_finite(tensors) == "b.weight"  # the first one, by name
    assert first_non_finite([("a", clean), ("ids", torch.arange(5))]) is None  # integers are never non-finite
    assert all_finite(torch.nn.Parameter(clean))  # a parameter that requires grad


def test_all_finite_has_one_home():
    """No module but io/tensors.py tests finiteness with torch.isfinite; ops.stream re-exports the same function."""
    from reforge.io import tensors
    from reforge.ops import stream

    assert stream.all_finite is tensors.all_finite
    others = {
        name: text.count("torch.isfinite(")
        for name, text in _sources(exclude=("io/tensors.py",)).items()
        if "torch.isfinite(" in text
    }
    assert others == {}
    assert "def all_finite(" in (PACKAGE / "io" / "tensors.py").read_text()
    assert [n for n, t in _sources(exclude=("io/tensors.py",)).items() if re.search(r"def all_finite\(", t)] == []
