"""The state a resumable `reforge train` run keeps besides its adapter tensors: the optimizer and scheduler state
and each rank's RNG, as ``torch.save`` files (``optim.pt``, ``rng-rank{R}.pt`` in a checkpoint folder).

Written whole or not at all (`reforge.io.atomic.write_atomic`); read back weights only, so a file that asks to run
code while unpickling is refused, never run. `reforge.train.state` decides what goes in and checks what comes out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reforge.io.atomic import write_atomic


def save_state(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) to ``path`` with ``torch.save``.

    Raises:
        OSError: from the disk; ``path`` is then untouched.
    """
    import torch

    return write_atomic(Path(path), lambda f: torch.save(state, f))


def load_state(path: Path) -> Any:
    """Read a file written by `save_state` onto the CPU, weights only.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError: it is not a
            weights-only torch file (truncated, another format, or a pickle asking for other objects).
    """
    import torch

    return torch.load(Path(path), map_location="cpu", weights_only=True)
