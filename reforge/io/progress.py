"""The progress callback every long-running API function takes, and never draws itself (the CLI draws it)."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, "int | None"], None]
"""``progress(done, total)``: ``done`` units (bytes, tensors, steps) of ``total`` (None when not known yet)."""
