"""Where a training run keeps its state: checkpoints for ``--resume``, and the atomic hand-over of the output.

A run writing ``OUT`` works in the sibling folder ``.OUT.reforge-train/`` (same filesystem, so the final rename is
atomic; on several machines it must be on a shared filesystem):

    checkpoints/step-00000200/   adapter.safetensors (trainable tensors), optim.pt (optimizer + scheduler),
                                 rng-rank{R}.pt (each rank's torch RNG), meta.json (step, config, counters)
    final/                       the finished adapter, renamed to OUT when whole

Only the newest checkpoint is kept. Each is written under ``.tmp`` and renamed, so a crash mid-save leaves the
previous one intact. The work folder is removed once OUT is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from reforge.dist import Ranks, barrier
from reforge.errors import InvalidOptionError, OutputExistsError, short_path
from reforge.io import target
from reforge.train.config import RESUME_KEYS, TrainConfig

CHECKPOINTS = "checkpoints"


def work_dir(output: str | Path) -> Path:
    """The scratch folder of a run that writes ``output``."""
    output = Path(output)
    return output.parent / f".{output.name}.reforge-train"


def latest_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint folder under ``work``, or None."""
    folder = work / CHECKPOINTS
    found = (
        sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        if folder.is_dir()
        else []
    )
    return found[-1] if found else None


def check_output(config: TrainConfig) -> Path | None:
    """Refuse an output that holds something else, or stale checkpoints; return the checkpoint to resume from.

    Raises:
        OutputRefusedError, OutputExistsError: see `reforge.io.target.check_output`.
        OutputExistsError: ``output`` is not empty (without ``overwrite``), or a previous run left checkpoints and
            neither ``resume`` nor ``overwrite`` says what to do with them.
    """
    output = Path(config.output)
    inputs = [
        config.base,
        *config.corpus,
        config.only_ids,
        config.exclude_ids,
        *config.only_judged,
        *config.exclude_judged,
    ]
    target.check_output(output, inputs=inputs, overwrite=config.overwrite)  # never an input, nor others' files
    busy = output.exists() and (not output.is_dir() or any(output.iterdir()))
    if busy and not config.overwrite:
        raise OutputExistsError(
            f"Output {short_path(output)} already exists and is not empty.",
            hint="Pass --overwrite to replace it, or choose another -o folder.",
            path=output,
        )
    checkpoint = latest_checkpoint(work_dir(output))
    if checkpoint is not None and not config.resume and not config.overwrite:
        raise OutputExistsError(
            f"An earlier run writing {short_path(output)} stopped at {checkpoint.name} "
            f"(checkpoints in {short_path(checkpoint.parent.parent)}).",
            hint="Pass --resume to continue it, or --overwrite to start over.",
            path=checkpoint.parent.parent,
        )
    return checkpoint if config.resume else None


def resume_options(config: dict[str, Any]) -> dict[str, Any]:
    """The options `--resume` compares, as JSON gives them back: a checkpoint's saved lists and the CLI's tuples
    (``multiple=True`` options) are the same value."""
    return json.loads(json.dumps({k: config.get(k) for k in RESUME_KEYS}))


def start_fresh(work: Path, ranks: Ranks) -> None:
    """Remove what an earlier run left in ``work`` (rank 0), then wait for every rank."""
    if ranks.main and work.exists():
        shutil.rmtree(work)
    barrier(ranks)


def save_checkpoint(work: Path, step: int, *, model, optimizer, scheduler, meta: dict[str, Any], ranks: Ranks) -> Path:
    """Write a checkpoint after ``step`` optimizer steps: trainable tensors, optimizer, scheduler, every rank's
    RNG and ``meta``; keep only this one."""
    import torch

    from reforge.io.tensors import save_tensors

    final = work / CHECKPOINTS / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ranks)
    torch.save(_rng_state(), tmp / f"rng-rank{ranks.rank}.pt")
    if ranks.main:
        tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_tensors(tmp / "adapter.safetensors", tensors)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1), encoding="utf-8")
    barrier(ranks)
    if ranks.main:
        tmp.rename(final)
        for old in (work / CHECKPOINTS).glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(ranks)
    return final


def load_checkpoint(
    checkpoint: Path,
    config: TrainConfig,
    *,
    model,
    optimizer,
    scheduler,
    ranks: Ranks,
    corpus_sha256: str | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint` into ``model``, ``optimizer``, ``scheduler`` and this
    rank's RNG; return its meta.

    Raises:
        InvalidOptionError: the checkpoint was made with different training options, a different world size, or
            over a corpus whose hash was not ``corpus_sha256`` (same options, other text: other steps).
    """
    import torch

    from reforge.io.tensors import load_tensors

    meta = json.loads((checkpoint / "meta.json").read_text(encoding="utf-8"))
    saved, now = resume_options(meta["config"]), resume_options(config.to_dict())
    changed = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if changed:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise InvalidOptionError(
            f"Cannot resume from {short_path(checkpoint)}: options changed ({pairs}).",
            hint="Resume with the original options, or pass --overwrite to start over.",
            option=changed[0],
        )
    saved_corpus = meta.get("corpus_sha256")  # absent from checkpoints written before it was recorded
    if corpus_sha256 is not None and saved_corpus is not None and saved_corpus != corpus_sha256:
        raise InvalidOptionError(
            f"Cannot resume from {short_path(checkpoint)}: the corpus changed (sha256 {saved_corpus[:12]} -> "
            f"{corpus_sha256[:12]}), so the steps left are not the ones planned.",
            hint="Resume over the original corpus, or pass --overwrite to start over.",
            option="corpus",
        )
    if meta["world_size"] != ranks.world:
        raise InvalidOptionError(
            f"Cannot resume from {short_path(checkpoint)}: it was written by "
            f"{meta['world_size']} processes and this run has {ranks.world}.",
            hint="Launch the same number of processes, or --overwrite to start over.",
            option="world_size",
        )
    tensors = load_tensors(checkpoint / "adapter.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    state = torch.load(checkpoint / "optim.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(torch.load(checkpoint / f"rng-rank{ranks.rank}.pt", weights_only=True))
    return meta


def publish(final: Path, output: Path, work: Path) -> None:
    """Move the finished ``final`` folder to ``output`` (replacing what is there) and remove ``work``.

    Raises:
        DiskFullError, OutputRefusedError: the move failed; the message says where the whole adapter waits.
    """
    try:
        for path in final.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o644)  # safetensors' save_file creates 0600 files
        if output.exists() or output.is_symlink():
            trash = work / "replaced"
            os.replace(output, trash)
        os.replace(final, output)
    except OSError as e:
        raise target.write_error(
            e,
            output,
            f"The trained adapter is whole in {short_path(final)}: move that folder to {short_path(output)} yourself.",
        ) from e
    shutil.rmtree(work, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
