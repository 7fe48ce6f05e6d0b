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
from reforge.errors import InvalidOptionError, OutputExistsError, ResumeError, short_path
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
    RNG and ``meta``, plus what `load_checkpoint` checks (the base's content key, the resolved precision and input
    paths); keep only this one.

    Raises:
        NonFiniteError: a trainable tensor holds a NaN or Inf (training diverged); nothing is written.
    """
    from reforge.io.tensors import save_tensors
    from reforge.io.train_state import save_state

    _refuse_non_finite(trainable(model), step)  # every rank: their tensors are the same
    final = work / CHECKPOINTS / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ranks)
    save_state(tmp / f"rng-rank{ranks.rank}.pt", _rng_state())
    if ranks.main:
        save_tensors(tmp / ADAPTER, {name: p.detach().cpu().contiguous() for name, p in trainable(model).items()})
        save_state(tmp / OPTIM, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
        facts = {"base_key": base_key(model), "resolved": _resolved(meta["config"], model)}
        (tmp / META).write_text(json.dumps({**meta, **facts, "step": step}, indent=1), encoding="utf-8")
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
    rank's RNG; return its meta. Options are compared as resolved (``./c.jsonl`` and its absolute path, ``auto`` and
    the precision it chose, are the same); the base by its content, not its path.

    Raises:
        InvalidOptionError: the checkpoint was made with different training options, a different world size, over
            a base whose content differs from ``model``'s (same path, other weights), or over a corpus whose hash
            was not ``corpus_sha256`` (same options, other text: other steps).
        ResumeError: a checkpoint file is missing, unreadable or not what reforge writes; the adapter lacks a
            trainable tensor, has one of another shape, or holds a NaN or Inf.
    """
    import torch

    meta = _read_meta(checkpoint)
    _check_same_run(checkpoint, meta, config, model, corpus_sha256)
    if meta["world_size"] != ranks.world:
        raise InvalidOptionError(
            f"Cannot resume from {short_path(checkpoint)}: it was written by "
            f"{meta['world_size']} processes and this run has {ranks.world}.",
            hint="Launch the same number of processes, or --overwrite to start over.",
            option="world_size",
        )
    tensors = _read_adapter(checkpoint / ADAPTER, model)
    state = _load_pt(checkpoint / OPTIM, ("optimizer", "scheduler"))
    rng = _load_pt(checkpoint / f"rng-rank{ranks.rank}.pt", ("torch",))
    _refuse_non_finite_state(checkpoint / OPTIM, state["optimizer"])
    broken = (KeyError, ValueError, TypeError, RuntimeError, IndexError)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except broken as e:
        raise _unusable(checkpoint / OPTIM, f"holds a state this run's optimizer cannot take ({_first_line(e)})") from e
    try:
        _set_rng_state(rng)
    except broken as e:
        raise _unusable(checkpoint / f"rng-rank{ranks.rank}.pt", f"is not a torch RNG state ({_first_line(e)})") from e
    params = trainable(model)
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return meta


def trainable(model) -> dict[str, Any]:
    """The tensors a checkpoint holds: every parameter of ``model`` that requires a gradient, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def base_key(model) -> str:
    """The content key of the folder ``model``'s base weights were loaded from (transformers keeps it as
    ``name_or_path``): what a checkpoint records so that a base replaced at the same path is refused."""
    from reforge.io.checkpoint import content_key

    return content_key(model.get_base_model().name_or_path)


ADAPTER, OPTIM, META = "adapter.safetensors", "optim.pt", "meta.json"
# Options naming files: compared resolved, so that ./c.jsonl and /home/u/c.jsonl are one corpus.
_PATH_KEYS = ("corpus", "only_ids", "exclude_ids", "only_judged", "exclude_judged")
# What meta.json must hold, and of which type (LoopState's counters, the options, the world size).
_META_TYPES = {
    "step": int,
    "predicted": int,
    "real": int,
    "pad": int,
    "train_time_s": (int, float),
    "losses": list,
    "config": dict,
    "world_size": int,
}


def _resolved(config: dict[str, Any], model) -> dict[str, Any]:
    """The options whose spelling may differ while their value does not: input paths resolved, and the precision
    the run actually uses (``auto`` is fp32 on CPU and bf16 on most GPUs)."""
    import torch

    def resolve(value):
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return [str(Path(v).resolve()) for v in value]
        return str(Path(value).resolve())

    dtype = next(model.get_base_model().parameters()).dtype
    return {
        **{key: resolve(config.get(key)) for key in _PATH_KEYS},
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
    }


def _check_same_run(checkpoint: Path, meta: dict[str, Any], config: TrainConfig, model, corpus_sha256) -> None:
    """Refuse a checkpoint of another run: other options, another base (by content), another corpus (by hash)."""
    resolved = meta.get("resolved") if isinstance(meta.get("resolved"), dict) else {}
    saved = {**resume_options(meta["config"]), **resolved}
    now = {**resume_options(config.to_dict()), **_resolved(config.to_dict(), model)}
    changed = [k for k in RESUME_KEYS if k != "base" and saved.get(k) != now.get(k)]
    if changed:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise InvalidOptionError(
            f"Cannot resume from {short_path(checkpoint)}: options changed ({pairs}).",
            hint="Resume with the original options, or pass --overwrite to start over.",
            option=changed[0],
        )
    saved_key, key = meta.get("base_key"), base_key(model)
    if saved_key != key:
        was = f"{saved_key[:12]} -> {key[:12]}" if isinstance(saved_key, str) else f"none recorded -> {key[:12]}"
        raise InvalidOptionError(
            f"Cannot resume from {short_path(checkpoint)}: the base {meta['config'].get('base')} -> {config.base} "
            f"is not the one it was trained on (content key {was}); the steps left would train another model.",
            hint="Resume over the original base, or pass --overwrite to start over.",
            option="base",
        )
    saved_corpus = meta.get("corpus_sha256")  # absent from checkpoints written before it was recorded
    if corpus_sha256 is not None and saved_corpus is not None and saved_corpus != corpus_sha256:
        raise InvalidOptionError(
            f"Cannot resume from {short_path(checkpoint)}: the corpus changed (sha256 {saved_corpus[:12]} -> "
            f"{corpus_sha256[:12]}), so the steps left are not the ones planned.",
            hint="Resume over the original corpus, or pass --overwrite to start over.",
            option="corpus",
        )


def _read_meta(checkpoint: Path) -> dict[str, Any]:
    file = checkpoint / META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise _unusable(file, "is missing") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _unusable(file, f"is not JSON ({_first_line(e)})") from e
    if not isinstance(meta, dict):
        raise _unusable(file, f"holds a JSON {type(meta).__name__}, not the object reforge writes")
    for key, kind in _META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise _unusable(file, f"lacks {key!r} or holds a {type(meta.get(key)).__name__} there")
    if f"step-{meta['step']:08d}" != checkpoint.name or len(meta["losses"]) != meta["step"]:
        raise _unusable(file, f"says step {meta['step']} with {len(meta['losses'])} losses in {checkpoint.name}")
    return meta


def _read_adapter(file: Path, model) -> dict[str, Any]:
    """The checkpoint's trainable tensors: exactly the model's set, each of its shape, every value finite."""
    from reforge.errors import ReforgeError
    from reforge.io.tensors import first_non_finite, load_tensors

    try:
        tensors = load_tensors(file)
    except FileNotFoundError as e:
        raise _unusable(file, "is missing") from e
    except (ReforgeError, OSError) as e:
        raise _unusable(file, f"cannot be read ({_first_line(e)})") from e
    params = trainable(model)
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing:
        raise _unusable(
            file, f"lacks {len(missing)} of the {len(params)} trainable tensors, e.g. {missing[0]}", missing[0]
        )
    if extra:
        raise _unusable(file, f"holds {len(extra)} tensors this run does not train, e.g. {extra[0]}", extra[0])
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(params[name].shape):
            shapes = f"{tuple(value.shape)} where the model has {tuple(params[name].shape)}"
            raise _unusable(file, f"holds {name} of shape {shapes}", tensor=name)
    bad = first_non_finite(tensors.items())
    if bad is not None:
        raise _unusable(file, f"holds a NaN or Inf in {bad}", tensor=bad)
    return tensors


def _load_pt(file: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A dict written by `reforge.io.train_state.save_state`, weights only (a pickle that asks for anything else is
    refused, never run)."""
    import pickle

    from reforge.io.train_state import load_state

    try:
        state = load_state(file)
    except FileNotFoundError as e:
        raise _unusable(file, "is missing") from e
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as e:
        raise _unusable(file, f"is not a weights-only torch file ({_first_line(e)})") from e
    if not isinstance(state, dict) or any(key not in state for key in keys):
        raise _unusable(file, f"does not hold {', '.join(keys)}")
    return state


def _refuse_non_finite_state(file: Path, optimizer_state: Any) -> None:
    import torch

    from reforge.io.tensors import first_non_finite

    for slot in (optimizer_state.get("state") or {}).values() if isinstance(optimizer_state, dict) else []:
        tensors = ((k, v) for k, v in (slot.items() if isinstance(slot, dict) else []) if isinstance(v, torch.Tensor))
        name = first_non_finite(tensors)
        if name is not None:
            raise _unusable(file, f"holds a NaN or Inf in the optimizer's {name}")


def _refuse_non_finite(tensors: dict[str, Any], step: int) -> None:
    from reforge.errors import NonFiniteError
    from reforge.io.tensors import first_non_finite

    name = first_non_finite((k, v.detach()) for k, v in tensors.items())
    if name is not None:
        raise NonFiniteError(
            f"Training diverged: {name} holds a NaN or Inf after step {step}; no checkpoint was written for it.",
            hint="Lower --lr (or raise --warmup-steps), or check the corpus; --resume continues from the last "
            "good checkpoint.",
            tensor=name,
            path=None,
        )


def _unusable(file: Path, what: str, tensor: str | None = None) -> ResumeError:
    return ResumeError(
        f"Cannot resume: {short_path(file)} {what}.",
        hint="Pass --overwrite to start over (the checkpoint is not what this run wrote).",
        path=file,
        tensor=tensor,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def publish(final: Path, output: Path, work: Path) -> None:
    """Commit the finished ``final`` folder to ``output`` (replacing what is there) with
    `reforge.io.target.commit_staging`, as every writer does, and remove ``work``.

    Raises:
        DiskFullError, OutputRefusedError: the move failed; the message says where the whole adapter waits.
    """
    hint = f"The trained adapter is whole in {short_path(final)}: move that folder to {short_path(output)} yourself."
    try:
        for path in final.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o644)  # safetensors' save_file creates 0600 files
    except OSError as e:
        raise target.write_error(e, output, hint) from e
    target.commit_staging(final, output, hint=hint)  # the one commit protocol: the writer's too
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
