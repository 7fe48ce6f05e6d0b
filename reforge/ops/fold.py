"""How far a knowledge adapter moves its base (`update_size`, for `reforge inspect`).

Opening an adapter, its checks and the fold itself (Psi from the LoRA/DoRA factors) live in `reforge.io.adapter`,
shared by merge, diff and eval's in-memory merge.
"""

from __future__ import annotations

import math

from reforge.errors import AdapterError, short_path
from reforge.io.adapter import (
    open_adapter,
)
from reforge.io.checkpoint import open_model
from reforge.io.progress import ProgressFn


def update_size(
    adapter_ref, base_ref, *, token=None, allow_pickle: bool = False, progress: ProgressFn | None = None
) -> dict:
    """How far a knowledge adapter moves the base: ``||Psi||_F / ||W||_F`` for each weight it changes.

    Streams one module at a time (its base weight and dense fp32 Psi in memory, nothing more). Adapters trained
    with the same recipe on more steps or at a larger learning rate come out larger; the merge adds ``alpha``
    times this.

    Returns:
        A JSON-able dict: ``base``, ``modules`` (how many weights), ``norm`` (``||Psi||_F`` over all of them),
        ``relative`` (``mean``, ``median`` and ``max`` of the per-weight ratios, and ``max_tensor``), and
        ``by_target`` (the mean ratio per target module name, e.g. ``q_proj``).

    Raises:
        the errors of `open_adapter`, and AdapterError naming the tensor where Psi is not finite.
    """
    import statistics

    base = open_model(base_ref, token=token, allow_pickle=allow_pickle)
    base_keys = base.canonical_keys()
    shapes = {k: base.index.tensors[v].shape for k, v in base_keys.items()}
    adapter = open_adapter(adapter_ref, base, shapes, token=token, allow_pickle=allow_pickle)
    ratios: dict[str, float] = {}
    squared = 0.0
    with base.reader() as base_reader, adapter.checkpoint.reader() as adapter_reader:
        for done, target in enumerate(sorted(adapter.modules)):
            weight = base_reader.get(base_keys[target]).float()
            psi = adapter.psi(target, adapter_reader.get, weight)
            norm = float(psi.double().norm())
            if not math.isfinite(norm):
                raise AdapterError(
                    f"{short_path(adapter.checkpoint.path)}: Psi of {target!r} is not finite.",
                    hint="The adapter's factors hold NaN or inf; train it again.",
                    path=adapter.checkpoint.path,
                    tensor=target,
                )
            squared += norm**2
            ratios[target] = norm / max(float(weight.double().norm()), 1e-30)
            if progress:
                progress(done + 1, len(adapter.modules))
    by_target: dict[str, list[float]] = {}
    for target, ratio in ratios.items():
        by_target.setdefault(target.rsplit(".", 2)[-2], []).append(ratio)
    largest = max(ratios, key=ratios.__getitem__)
    return {
        "base": str(base_ref),
        "modules": len(ratios),
        "norm": math.sqrt(squared),
        "relative": {
            "mean": statistics.fmean(ratios.values()),
            "median": statistics.median(ratios.values()),
            "max": ratios[largest],
            "max_tensor": largest,
        },
        "by_target": {name: statistics.fmean(values) for name, values in sorted(by_target.items())},
    }
