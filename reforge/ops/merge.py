"""`merge`: base + sum_i alpha_i * Psi_i + beta * Delta, tensor by tensor, in the retriever's layout.

Each output tensor is computed in fp32 from the stored inputs and rounded once to the output dtype:
- with ``retriever`` and beta = 1 the formula is retriever + sum alpha_i * Psi_i (no stored-Delta rounding), and a
  tensor no adapter touches is the retriever's tensor copied bit for bit (alpha = 0 reproduces the retriever);
- with ``retriever`` and beta != 1: base + beta * (retriever - base) + sum alpha_i * Psi_i;
- with ``delta``: base + beta * Delta + sum alpha_i * Psi_i, inheriting the Delta's recorded rounding;
- a peft LoRA retriever (RepLLaMA form) is folded on the fly: Delta = its dense update, zero elsewhere.
Psi_i is folded from adapter i against the *base* weight (DoRA's row norm uses it), exactly as in `ops.fold`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from reforge.errors import AdapterError, InvalidOptionError, LayoutMismatchError, ProvenanceMismatchError, short_path
from reforge.io.checkpoint import AdapterCheckpoint, Checkpoint, open_checkpoint, open_model
from reforge.io.companions import companion_files, output_companions
from reforge.io.format import safetensors_dtype, torch_dtype
from reforge.io.writer import CheckpointWriter, ShardPlan, TensorSpec, plan_id_for
from reforge.ops.delta import RETRIEVER_FILES, DeltaCheckpoint
from reforge.ops.diff import DTYPE_NAMES
from reforge.ops.fold import LoraAdapter

if TYPE_CHECKING:
    import torch


@dataclass
class MergeReport:
    """What `merge` did (or, with ``dry_run``, would do). ``plan`` maps each output tensor to its terms."""

    output: Path
    tensors: int
    total_size: int
    shards: list[int]
    dtype: str
    changed: int
    dry_run: bool = False
    already_complete: bool = False
    resumed_shards: int = 0
    max_abs_rounding: float = 0.0
    seconds: float = 0.0
    plan: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Source:
    """The opened inputs and how output keys map onto them."""

    base: Checkpoint
    base_keys: dict[str, str]
    retriever: Checkpoint | None
    retriever_adapter: LoraAdapter | None
    delta: DeltaCheckpoint | None
    adapters: list[tuple[LoraAdapter, float]]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    stored_names: dict[str, str]


def merge(base: str | Path, output: str | Path, *, retriever: str | Path | None = None,
          delta: str | Path | None = None, adapters: list[tuple[str | Path, float]] = (), beta: float = 1.0,
          dtype: str = "auto", max_shard_size: int = 5 * 10**9, overwrite: bool = False, token: str | None = None,
          allow_pickle: bool = False, dry_run: bool = False, command: str | None = None, corpus: str | None = None,
          progress: Callable[[int, int | None], None] | None = None) -> MergeReport:
    """Write the readapted retriever into ``output``.

    Args:
        base: the pretrained LM both the retriever and the adapters start from.
        retriever / delta: exactly one: the retriever (full or peft LoRA), or a delta folder from `diff`.
        adapters: ``[(adapter folder, alpha), ...]`` knowledge adapters (peft LoRA/DoRA trained on ``base``).
        beta: weight of Delta.
        dtype: ``auto`` keeps each tensor's dtype as the retriever stores it; or float32/bfloat16/float16.

    Raises:
        InvalidOptionError, AdapterError, LayoutMismatchError, ProvenanceMismatchError: checked before any tensor
            is read or written.
    """
    started = time.perf_counter()
    _check_options(retriever, delta, adapters, beta, dtype)
    source = _open_sources(base, retriever, delta, adapters, token, allow_pickle)
    plan = {key: _terms(source, key, beta) for key in source.shapes}
    specs = [TensorSpec(source.stored_names[k], DTYPE_NAMES.get(dtype, source.dtypes[k]), source.shapes[k])
             for k in source.shapes]
    plan_id = plan_id_for({"op": "merge", "base": source.base.provenance["fingerprint"],
                           "retriever": source.retriever.provenance["fingerprint"] if source.retriever else None,
                           "retriever_adapter": (source.retriever_adapter.checkpoint.provenance["fingerprint"]
                                                 if source.retriever_adapter else None),
                           "delta": source.delta.manifest.get("plan_id") if source.delta else None,
                           "adapters": [(a.checkpoint.provenance["fingerprint"], alpha) for a, alpha in source.adapters],
                           "beta": beta, "specs": [(s.name, s.dtype, s.shape) for s in specs],
                           "shard": max_shard_size})
    shard_plan = ShardPlan.build(specs, max_shard_size)
    report = MergeReport(Path(output), len(specs), shard_plan.total_size, shard_plan.shard_sizes(),
                         dtype if dtype != "auto" else _dominant(source.dtypes), sum(1 for t in plan.values()
                                                                                    if t != ["retriever"]),
                         dry_run=dry_run, plan={k: v for k, v in plan.items()})
    if dry_run:
        return report
    manifest = _manifest(source, beta, dtype, command, corpus)
    with CheckpointWriter(output, specs, plan_id=plan_id, max_shard_size=max_shard_size, manifest=manifest,
                          overwrite=overwrite, progress=progress) as writer:
        report.already_complete, report.resumed_shards = writer.already_complete, writer.resumed_shards
        _add_companions(writer, source, manifest)
        if not writer.already_complete:
            _write_tensors(writer, source, beta, specs)
        writer.manifest["max_abs_rounding"] = max((r["max_abs_rounding"] for r in writer.records.values()),
                                                  default=0.0)
        report.max_abs_rounding = writer.manifest["max_abs_rounding"]
    report.seconds = time.perf_counter() - started
    return report


def _check_options(retriever, delta, adapters, beta: float, dtype: str) -> None:
    if (retriever is None) == (delta is None):
        raise InvalidOptionError("give exactly one of --retriever (Delta computed on the fly) and --delta "
                                 "(a folder from `reforge diff`).", option="--retriever")
    for ref, alpha in adapters:
        if not math.isfinite(alpha):
            raise InvalidOptionError(f"alpha for adapter {ref} is {alpha}; it must be a finite number.",
                                     option="--alpha")
    if not math.isfinite(beta):
        raise InvalidOptionError(f"--beta is {beta}; it must be a finite number.", option="--beta")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise InvalidOptionError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}.",
                                 option="--dtype")


def _open_sources(base_ref, retriever_ref, delta_ref, adapter_refs, token, allow_pickle) -> _Source:
    base = open_model(base_ref, token=token, allow_pickle=allow_pickle)
    base_keys = base.canonical_keys()
    base_shapes = {k: base.index.tensors[v].shape for k, v in base_keys.items()}
    retriever = retriever_adapter = delta = None
    if delta_ref is not None:
        delta = DeltaCheckpoint.open(delta_ref)
        delta.check_base(base.provenance)
        shapes = delta.shapes
        dtypes = {k: delta.manifest.get("retriever_dtypes", {}).get(k, delta.manifest["dtype"]) for k in shapes}
        _check_delta_files(delta)
        stored = {k: k for k in shapes}
    else:
        opened = open_checkpoint(retriever_ref, token=token, allow_pickle=allow_pickle)
        if isinstance(opened, AdapterCheckpoint):
            retriever_adapter = LoraAdapter(opened)
            retriever_adapter.check_shapes(base_shapes)
            shapes = dict(base_shapes)
            dtypes = {k: base.index.tensors[v].dtype for k, v in base_keys.items()}
            stored = {k: k for k in shapes}
        else:
            retriever = opened
            retriever_keys = retriever.canonical_keys()
            shapes = {k: retriever.index.tensors[v].shape for k, v in retriever_keys.items()}
            dtypes = {k: retriever.index.tensors[v].dtype for k, v in retriever_keys.items()}
            stored = dict(retriever_keys)
            _check_retriever_against_base(base, retriever, retriever_keys, base_shapes)
    adapters = [(_open_adapter(ref, base, shapes, token, allow_pickle), alpha) for ref, alpha in adapter_refs]
    return _Source(base, base_keys, retriever, retriever_adapter, delta, adapters, shapes, dtypes, stored)


def _check_delta_files(delta: DeltaCheckpoint) -> None:
    """Every tensor the manifest promises must be in the files (dense, or both factors), checked up front."""
    from reforge.ops.delta import factor_keys

    stored = set(delta.index.tensors)
    for key in delta.shapes:
        names = factor_keys(key) if key in delta.factored else () if key in delta.zero else (key,)
        missing = [n for n in names if n not in stored]
        if missing:
            raise LayoutMismatchError(f"{short_path(delta.path)} lists {key!r} but holds no tensor {missing[0]!r}.",
                                      hint="The delta folder is damaged; run `reforge diff` again.",
                                      left=str(delta.path), right=None, tensor=key, details={})


def _check_retriever_against_base(base: Checkpoint, retriever: Checkpoint, retriever_keys: dict[str, str],
                                  base_shapes: dict[str, tuple]) -> None:
    for key, stored in retriever_keys.items():
        shape = retriever.index.tensors[stored].shape
        if key in base_shapes and base_shapes[key] != shape and not (
                len(shape) == 2 and base_shapes[key][1:] == shape[1:] and shape[0] > base_shapes[key][0]):
            raise LayoutMismatchError(f"tensor {key!r} is {list(base_shapes[key])} in base {base.ref} but "
                                      f"{list(shape)} in retriever {retriever.ref}.",
                                      hint="Is this retriever trained from this base?", left=base.ref,
                                      right=retriever.ref, tensor=key, details={})


def _open_adapter(ref, base: Checkpoint, output_shapes: dict[str, tuple], token, allow_pickle) -> LoraAdapter:
    checkpoint = open_checkpoint(ref, token=token, allow_pickle=allow_pickle)
    if not isinstance(checkpoint, AdapterCheckpoint):
        raise AdapterError(f"{ref} is not a peft adapter folder (no adapter_config.json).",
                           hint="Pass the folder `reforge train` wrote.", path=checkpoint.path, tensor=None)
    adapter = LoraAdapter(checkpoint)
    _check_adapter_base(checkpoint, base)
    lacking = sorted(set(adapter.modules) - set(output_shapes))
    if lacking:
        raise AdapterError(f"{short_path(checkpoint.path)} adapts {len(lacking)} tensor(s) the retriever does not "
                           f"have (e.g. {lacking[0]!r}).", hint="Was it trained on this retriever's base model?",
                           path=checkpoint.path, tensor=lacking[0])
    base_keys = base.canonical_keys()
    adapter.check_shapes({k: base.index.tensors[v].shape for k, v in base_keys.items()})
    return adapter


def _check_adapter_base(checkpoint: AdapterCheckpoint, base: Checkpoint) -> None:
    """Refuse an adapter whose training record names a different base (by content fingerprint)."""
    import json

    record_file = checkpoint.path / "training_record.json"
    if not record_file.is_file():
        return
    try:
        recorded = (json.loads(record_file.read_text()).get("base") or {}).get("fingerprint")
    except ValueError:
        return
    found = base.provenance.get("fingerprint")
    if recorded and found and recorded != found:
        raise ProvenanceMismatchError(
            f"{short_path(checkpoint.path)} was trained on base fingerprint {recorded}, but the base given "
            f"({base.ref}) has fingerprint {found}.", hint="Pass the base the adapter was trained on.",
            path=checkpoint.path, expected=recorded, found=found)


def _terms(source: _Source, key: str, beta: float) -> list[str]:
    """Human-readable terms of one output tensor, for --dry-run and the manifest."""
    adapters = [f"{alpha:g}*psi[{Path(str(a.checkpoint.ref)).name}]" for a, alpha in source.adapters
                if alpha != 0 and key in a.modules]
    if source.retriever is not None and beta == 1:
        return ["retriever", *adapters]
    delta_changes = source.retriever_adapter is None or key in source.retriever_adapter.modules
    if source.delta is not None:
        delta_changes = key not in source.delta.zero
    terms = ["base"] + ([f"{beta:g}*delta"] if delta_changes and beta != 0 else [])
    return terms + adapters


def _write_tensors(writer: CheckpointWriter, source: _Source, beta: float, specs: list[TensorSpec]) -> None:
    readers = _Readers(source)
    try:
        for spec, key in zip(specs, source.shapes):
            if writer.pending(spec.name):
                exact, copied = _output_tensor(source, readers, key, beta)
                stored = exact if copied and exact.dtype == torch_dtype(spec.dtype) else exact.to(torch_dtype(spec.dtype))
                error = 0.0 if copied else float((stored.float() - exact).abs().max()) if exact.numel() else 0.0
                writer.write(spec.name, stored)
                writer.record(spec.name, {"max_abs_rounding": error})
    finally:
        readers.close()


class _Readers:
    """One lazy reader per input, opened once."""

    def __init__(self, source: _Source) -> None:
        self.base = source.base.reader()
        self.retriever = source.retriever.reader() if source.retriever else None
        self.retriever_adapter = source.retriever_adapter.checkpoint.reader() if source.retriever_adapter else None
        self.delta = source.delta.reader() if source.delta else None
        self.adapters = [a.checkpoint.reader() for a, _ in source.adapters]

    def close(self) -> None:
        for reader in [self.base, self.retriever, self.retriever_adapter, self.delta, *self.adapters]:
            if reader is not None:
                reader.close()


def _output_tensor(source: _Source, readers: _Readers, key: str, beta: float) -> tuple["torch.Tensor", bool]:
    """The exact fp32 output for ``key``, or the retriever's stored tensor when nothing changes it (copied=True)."""
    active = [(a, alpha, r) for (a, alpha), r in zip(source.adapters, readers.adapters)
              if alpha != 0 and key in a.modules]
    base_weight = None
    dora = any(adapter.modules[key].magnitude_key is not None for adapter, _, _ in active)
    if dora or not (source.retriever is not None and beta == 1):
        base_weight = _base_tensor(source, readers, key)
    if source.retriever is not None:
        value = readers.retriever.get(source.retriever.layout.stored(key))
        if beta == 1 and not active:
            return value, True
        value = value.float()
        if beta != 1:
            value = _plus_scaled_delta(_padded(base_weight, value.shape), value - _padded(base_weight, value.shape),
                                       beta)
    else:
        delta = _delta_tensor(source, readers, key, base_weight)
        value = _plus_scaled_delta(_padded(base_weight, delta.shape), delta, beta)
    for adapter, alpha, reader in active:
        psi = adapter.psi(key, reader.get, base_weight)
        rows = psi.shape[0]
        value[:rows] += alpha * psi
    return value, False


def _plus_scaled_delta(base: "torch.Tensor", delta: "torch.Tensor", beta: float) -> "torch.Tensor":
    return base + delta if beta == 1 else base + beta * delta


def _base_tensor(source: _Source, readers: _Readers, key: str) -> "torch.Tensor | None":
    stored = source.base_keys.get(key)
    return readers.base.get(stored).float() if stored is not None else None


def _padded(base: "torch.Tensor | None", shape: tuple) -> "torch.Tensor":
    """The base tensor, zero where the retriever has rows (added tokens) or tensors the base lacks."""
    import torch

    if base is None:
        return torch.zeros(shape, dtype=torch.float32)
    if tuple(base.shape) == tuple(shape):
        return base
    padded = torch.zeros(shape, dtype=torch.float32)
    padded[: base.shape[0]] = base
    return padded


def _delta_tensor(source: _Source, readers: _Readers, key: str, base_weight) -> "torch.Tensor":
    import torch

    if source.delta is not None:
        return source.delta.get(readers.delta, key)
    adapter = source.retriever_adapter
    assert adapter is not None
    if key in adapter.modules:
        return adapter.psi(key, readers.retriever_adapter.get, base_weight)
    return torch.zeros(source.shapes[key], dtype=torch.float32)


def _dominant(dtypes: dict[str, str]) -> str:
    values = list(dtypes.values())
    return max(set(values), key=values.count) if values else "F32"


def _manifest(source: _Source, beta: float, dtype: str, command: str | None, corpus: str | None) -> dict:
    retriever = (source.retriever.provenance if source.retriever else
                 source.retriever_adapter.checkpoint.provenance if source.retriever_adapter else
                 source.delta.manifest.get("retriever"))
    return {
        "kind": "merge",
        "base": source.base.provenance,
        "retriever": retriever,
        "delta": {"path": str(source.delta.path.resolve()), "plan_id": source.delta.manifest.get("plan_id"),
                  "max_abs_rounding": source.delta.manifest.get("max_abs_rounding")} if source.delta else None,
        "adapters": [{**a.checkpoint.provenance, "alpha": alpha, "dora": a.is_dora,
                      "corpus": corpus or _adapter_corpus(a)} for a, alpha in source.adapters],
        "beta": beta,
        "dtype": dtype,
        "command": command,
    }


def _adapter_corpus(adapter: LoraAdapter) -> str | None:
    import json

    record = adapter.checkpoint.path / "training_record.json"
    try:
        corpus = json.loads(record.read_text()).get("corpus") if record.is_file() else None
    except ValueError:
        return None
    if isinstance(corpus, dict):
        return corpus.get("path") or corpus.get("source")
    return corpus


def _add_companions(writer: CheckpointWriter, source: _Source, manifest: dict) -> None:
    if source.delta is not None:
        files = companion_files(source.delta.path / RETRIEVER_FILES)
    elif source.retriever_adapter is not None:
        files = output_companions(source.retriever_adapter.checkpoint.path, None, from_base=source.base.path,
                                  base_config=source.base.config)
    else:
        files = output_companions(source.retriever.path, source.retriever.config)
    for name, content in files.items():
        writer.add_file(name, content)
    writer.add_file("README.md", _model_card(manifest, "modules.json" in files))


def _model_card(manifest: dict, sentence_transformers: bool) -> str:
    from reforge import __version__

    info = {**manifest, "reforge_version": __version__,
            "library_name": "sentence-transformers" if sentence_transformers else "transformers"}
    try:
        from reforge.card import render_model_card
    except ImportError:  # the card module is optional for merging
        return f"# Readapted retriever\n\nMade with reforge {__version__}.\n"
    return render_model_card(info)
