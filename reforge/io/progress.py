"""The callbacks long-running API functions take, and never draw themselves (the CLI draws them)."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, "int | None"], None]
"""``progress(done, total)``: ``done`` units (bytes, tensors, steps) of ``total`` (None when not known yet)."""

StageFn = Callable[[str], None]
"""``stage(text)``: the work moved to a new stage, named by ``text`` (e.g. "Merging alpha=0.5 in memory")."""
