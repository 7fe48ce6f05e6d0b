"""Experiment tracking for `reforge train --report-to`: accelerate's own trackers, fed from the progress callback.

Only TensorBoard is wired (``--report-to tensorboard``, which needs the ``tensorboard`` package). The tracker opens on
the first step it hears of, so in a multi-process run only rank 0 (the one `train_adapter` reports progress on)
writes event files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reforge.errors import InvalidOptionError

REPORT_TO = ("none", "tensorboard")


@contextmanager
def step_logger(
    report_to: str, logging_dir: str | Path, run_name: str, config: dict[str, Any]
) -> Iterator[Callable[[int, Any], None] | None]:
    """A ``log(step, stats)`` callable writing loss, learning rate and tokens/s per optimizer step to
    ``logging_dir/run_name``, with ``config`` as the run's hyperparameters; None for ``report_to="none"``.

    Raises:
        InvalidOptionError: an unknown tracker, or TensorBoard without the ``tensorboard`` package.
    """
    if report_to == "none":
        yield None
        return
    if report_to != "tensorboard":
        raise InvalidOptionError(
            f"--report-to {report_to!r} is not supported (choose from {', '.join(REPORT_TO)}).", option="--report-to"
        )
    _check_tensorboard()
    tracker = None

    def log(step: int, stats: Any) -> None:
        nonlocal tracker
        if tracker is None:
            from accelerate import PartialState
            from accelerate.tracking import TensorBoardTracker

            PartialState()  # accelerate's trackers log through its logger, which wants its state set up
            tracker = TensorBoardTracker(run_name, str(logging_dir))
            tracker.main_process_only = False  # only rank 0 reports steps; no accelerate state to set up
            tracker.start()
            tracker.store_init_configuration(_hparams(config))
        tracker.log(
            {"train/loss": stats.loss, "train/learning_rate": stats.lr, "train/tokens_per_s": stats.tokens_per_s},
            step=step,
        )

    try:
        yield log
    finally:
        if tracker is not None:
            tracker.finish()


def _check_tensorboard() -> None:
    from importlib.util import find_spec

    if find_spec("tensorboard") is None:
        raise InvalidOptionError(
            "--report-to tensorboard needs the tensorboard package.",
            hint="pip install tensorboard (or reforge[tensorboard]).",
            option="--report-to",
        )


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's hparams take numbers, strings and booleans only."""
    plain = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        plain[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return plain
