"""Retrievers to evaluate: a model on disk (`ModelSource`, resolved but not loaded) or in memory (`Retriever`).

A source is resolved cheaply (path, content key, encoding profile); its weights are loaded only when some vectors
are not in the cache. A peft adapter folder is opened and checked against its base as merge opens and checks it
(`reforge.io.adapter.open_adapter`), then folded into the base loaded as a bare ``AutoModel`` with merge's own fold
(`LoraAdapter.psi`, fp32). Loaded weights must be finite: a NaN would otherwise make every score 0 and still exit 0.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reforge.errors import (
    AdapterError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NonFiniteError,
    PickleRefusedError,
    PoolingUndeterminedError,
    UnsupportedModelError,
    short_path,
)
from reforge.io.adapter_config import is_adapter, read_adapter_config
from reforge.io.companions import TOKENIZER_MARKERS, has_tokenizer
from reforge.io.manifest import read_manifest
from reforge.io.paths import located_inputs
from reforge.profiles import DECODER_TYPES, EncodingProfile, builtin_profile, detect_profile


@dataclass(frozen=True)
class Retriever:
    """A loaded encoder: a transformers model whose output has ``last_hidden_state``, and its tokenizer.

    Pass one to `reforge.eval.evaluate` to score a model that lives only in memory (e.g. a merge being tuned).
    ``fingerprint`` identifies the weights for the embedding cache (a content key of all their bytes, e.g. from
    `reforge.io.checkpoint.content_key`; never a path or a sample); leave it None to skip the cache.
    ``profile`` None means: last-token profile for a decoder LM, else `PoolingUndeterminedError`.
    """

    model: Any
    tokenizer: Any
    name: str
    profile: EncodingProfile | None = None
    fingerprint: str | None = None
    modules: tuple[Any, ...] = ()

    def finish(self, vectors: Any, profile: EncodingProfile) -> Any:
        """Pooled vectors through the profile's post-pooling ``modules`` (loaded in ``modules``), then normalized.

        Raises:
            UnsupportedModelError: the profile has modules this retriever did not load (never skipped).
        """
        import torch

        if len(profile.modules) != len(self.modules):
            raise UnsupportedModelError(
                f"The profile of {self.name!r} applies {len(profile.modules)} module(s) after pooling "
                f"({', '.join(profile.modules) or 'none'}), but {len(self.modules)} were loaded with the model.",
                hint="Load the model with `ModelSource.load` (it loads the sentence-transformers modules).",
                path=None,
                reason="modules not loaded",
            )
        for module in self.modules:
            vectors = module(vectors)
        return torch.nn.functional.normalize(vectors, p=2, dim=-1) if profile.normalize else vectors

    def resolved_profile(self) -> EncodingProfile:
        """``profile``, or the one implied by the model's architecture."""
        if self.profile is not None:
            return self.profile
        model_type = str(getattr(getattr(self.model, "config", None), "model_type", "")).lower()
        if model_type in DECODER_TYPES:
            return builtin_profile("last-token")
        raise PoolingUndeterminedError(
            f"Cannot tell how to pool the in-memory model {self.name!r} (model_type {model_type or 'unknown'!r}).",
            hint="Give Retriever(profile=...) or pass --pooling.",
            path=None,
            model_type=model_type or None,
        )


@dataclass(frozen=True)
class ModelSource:
    """A model on disk, resolved: where it is, what it is and how it encodes (profile).

    ``fingerprint`` is the content key of the weights (`reforge.io.checkpoint.content_key` of the folder, its
    sentence-transformers module folders and, for an adapter, its base): what the embedding cache keys on."""

    name: str
    ref: str
    path: Path
    fingerprint: str
    profile: EncodingProfile
    base_ref: str | None = None
    base_path: Path | None = None
    tokenizer_hash: str | None = None
    tokenizer_path: Path | None = None
    trust_remote_code: bool = False

    @property
    def cache_identity(self) -> str:
        """What the embedding cache keys on: the weights' content key and the tokenizer files."""
        return f"{self.fingerprint}:{self.tokenizer_hash}"

    def load(self, *, device: str, dtype: Any, allow_pickle: bool = False) -> Retriever:
        """Load the weights (merging an adapter into its base) onto ``device`` in ``dtype``, in eval mode."""
        from transformers import AutoModel, AutoTokenizer

        from reforge.eval.pooling import load_modules

        # without trust, transformers' own class is used explicitly (a config's auto_map is then ignored)
        remote = {"trust_remote_code": bool(self.trust_remote_code)}
        if self.base_path is not None:
            model = _load_adapter_merged(
                self.path, self.base_path, dtype=dtype, allow_pickle=allow_pickle, remote=remote
            )
        else:
            model = AutoModel.from_pretrained(transformer_dir(self.path), dtype=dtype, weights_only=True, **remote)
        tokenizer_dir = self.tokenizer_path or _tokenizer_dir(self.path, self.base_path, self.ref)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **remote)
        model.to(device).eval()
        modules = tuple(load_modules(self.path, self.profile.modules, device))
        for module in (model, *modules):
            check_finite(module, self.ref if self.base_path is None else f"{self.ref} merged into {self.base_ref}")
        return Retriever(model, tokenizer, self.name, self.profile, self.fingerprint, modules)

    def to_dict(self) -> dict[str, Any]:
        """Provenance for the JSON summary."""
        return {
            "name": self.name,
            "ref": self.ref,
            "path": str(self.path),
            "fingerprint": self.fingerprint,
            "base_ref": self.base_ref,
            "base_path": str(self.base_path) if self.base_path else None,
            "tokenizer_hash": self.tokenizer_hash,
            "profile": self.profile.to_dict(),
        }


def resolve_model(
    ref: str | Path,
    *,
    name: str | None = None,
    base: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    profile: str | None = None,
    pooling: str | None = None,
    tokenizer: str | Path | None = None,
    trust_remote_code: bool = False,
    builtin_class: bool = False,
) -> ModelSource:
    """Find a model (local folder or Hub id), key it by content and pick its encoding profile; load no weights.

    Args:
        ref: a folder, or a Hub id ``owner/name[@revision]``.
        name: shown in tables (default: the folder name, or the Hub id).
        base: for a peft adapter, the base model to load it over (default: ``base_model_name_or_path``).
        token, allow_pickle: passed to the checkpoint reader. Pickle weights (``pytorch_model.bin``) are refused
            unless ``allow_pickle``, and then read with ``weights_only=True``.
        profile, pooling: see `detect_profile`.
        tokenizer: a folder with the tokenizer files, for a model folder that has none.
        trust_remote_code: allow a model whose config asks for its own code (``auto_map``); refused otherwise.
        builtin_class: load such a model with transformers' own class instead, running no code of the model's (for
            `verify`, which compares two models' weights and never needs the model's code).

    Raises:
        CheckpointNotFoundError: the folder does not exist (or the Hub id cannot be fetched).
        AdapterError: an adapter whose config names no base, or whose tensors do not fit the base.
        ProvenanceMismatchError: the adapter's training record names another base (as merge and inspect refuse).
        PickleRefusedError: only pickle weights and no ``allow_pickle``.
        CorruptCheckpointError, UnsafePathError, CheckpointNotFoundError: weights diff and merge would refuse too
            (a malformed header, a shard linked out of the folder, no weights file it can read).
        UnsupportedModelError: no tokenizer anywhere, or remote code without ``trust_remote_code``.
        PoolingUndeterminedError: see `detect_profile`.
    """
    path = _resolve_local(str(ref), token=token, allow_pickle=allow_pickle)
    base_ref = base_path = None
    fingerprint = _content_key(path)
    if is_adapter(path):
        base_ref = base or read_adapter_config(path).get("base_model_name_or_path")
        if not base_ref:
            raise AdapterError(
                f"{short_path(path)}/adapter_config.json names no base model.",
                hint="Pass --base PATH_OR_HUB_ID.",
                path=path,
                tensor=None,
            )
        base_path = _resolve_base(str(base_ref), path, given=base is not None, token=token, allow_pickle=allow_pickle)
        _open_adapter(path, base_path, allow_pickle=allow_pickle)
        fingerprint = hashlib.sha256(f"{fingerprint}+{_content_key(base_path)}".encode()).hexdigest()
    weights_dir = base_path or transformer_dir(path)
    _check_pickle(weights_dir, allow_pickle)
    if base_path is None:  # (an adapter and its base were opened by _open_adapter)
        _check_weights(weights_dir, allow_pickle)
    _check_remote_code(weights_dir, trust_remote_code or builtin_class)
    shown = name or (Path(str(ref)).name if Path(str(ref)).exists() else str(ref))
    chosen = detect_profile(path, name=str(ref), base_dir=base_path, profile=profile, pooling=pooling)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else _tokenizer_dir(path, base_path, str(ref))
    return ModelSource(
        shown,
        str(ref),
        path,
        fingerprint,
        chosen,
        str(base_ref) if base_ref else None,
        base_path,
        _tokenizer_hash(tokenizer_dir),
        tokenizer_dir,
        trust_remote_code,
    )


def _tokenizer_dir(path: Path, base_path: Path | None, ref: str) -> Path:
    """Where the tokenizer files are: the model's (or its Transformer module's) folder, else an adapter's base.

    Raises:
        UnsupportedModelError: none of them has tokenizer files (a tokenizer made up on the spot would map every
            word to an unknown token and still score).
    """
    for folder in (transformer_dir(path), path, base_path, _recorded_base(path)):
        if folder is not None and has_tokenizer(folder):
            return folder
    looked = ", ".join(short_path(f) for f in dict.fromkeys([transformer_dir(path), path, base_path]) if f)
    raise UnsupportedModelError(
        f"{ref} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)}; looked in {looked}).",
        hint="Pass --tokenizer DIR, or copy the tokenizer files of the model it was trained from into the folder.",
        path=path,
        reason="no tokenizer",
    )


def _recorded_base(path: Path) -> Path | None:
    """The local base folder a reforge output records in its reforge.json (merges, deltas), if it still exists
    (an unreadable reforge.json records none)."""
    try:
        manifest = read_manifest(path)
    except CorruptCheckpointError:
        return None
    if manifest is None:
        return None
    base = located_inputs(manifest.data, path).get("base")  # recorded relative to the folder since issue 26
    local = base.get("path") if isinstance(base, dict) else None
    return Path(local) if local and Path(local).is_dir() else None


def _check_pickle(folder: Path, allow_pickle: bool) -> None:
    """Refuse a model whose weights exist only as pickle files unless ``allow_pickle`` (then weights_only)."""
    names = [p.name for p in folder.glob("*") if p.is_file()]
    if any(n.endswith(".safetensors") for n in names) or allow_pickle:
        return
    pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")) and n != "training_args.bin")
    if pickles:
        raise PickleRefusedError(
            f"{short_path(folder / pickles[0])} is a pickle file and the model has no safetensors weights.",
            hint="Pass --allow-pickle to load it with torch.load(weights_only=True).",
            path=folder / pickles[0],
        )


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    """Index the weights as diff, merge and inspect do (`reforge.io.index.ShardIndex.from_dir`), before transformers
    reads them: the same rules and the same one-line errors for a shard linked out of the folder, a malformed or
    overlapping safetensors header, a pickle that is not weights-only or predates torch's zip format, and a folder
    with no weights it can read (only a ``.pt`` file)."""
    from reforge.io.index import ShardIndex

    ShardIndex.from_dir(folder, allow_pickle=allow_pickle)


def _check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse a model whose config asks for its own Python code (``auto_map``), unless the user trusts it: loaded
    without it, transformers would use its own class and encode differently (e.g. causal instead of
    bidirectional attention)."""
    config_file = folder / "config.json"
    if trust_remote_code or not config_file.is_file():
        return
    try:
        auto_map = json.loads(config_file.read_text(encoding="utf-8")).get("auto_map") or {}
    except ValueError:
        return
    if auto_map:
        first = next(iter(auto_map.values()))
        raise UnsupportedModelError(
            f"{short_path(folder)}/config.json asks for the model's own code ({first}); without it transformers "
            f"would load its built-in class, which may not encode the way the authors do.",
            hint="Read the code it ships, then pass --trust-remote-code to run it.",
            path=folder,
            reason="remote code",
        )


def _resolve_base(ref: str, adapter: Path, *, given: bool, token: str | None, allow_pickle: bool) -> Path:
    """The local folder of an adapter's base. A relative path in adapter_config.json is relative to the adapter
    folder (what `reforge train` writes: ``../base``), wherever eval runs; an absolute one (older adapters) and a Hub
    id are taken as they are, and so is ``--base`` as the user typed it. A base taken from adapter_config.json that
    cannot be found says so: the user never typed that name."""
    if not given and not Path(ref).is_absolute() and (adapter / ref).is_dir():
        ref = os.path.normpath(adapter.absolute() / ref)
    try:
        return _resolve_local(ref, token=token, allow_pickle=allow_pickle)
    except CheckpointNotFoundError as e:
        if given:
            raise
        raise CheckpointNotFoundError(
            f"The base model {ref!r} named in {short_path(adapter)}/adapter_config.json (base_model_name_or_path) "
            f"is not a folder here and could not be fetched ({e.message}).",
            hint="Pass --base PATH_OR_HUB_ID with the base model the adapter was trained on.",
            ref=ref,
        ) from e


def transformer_dir(path: Path) -> Path:
    """The folder holding the transformer weights: ``path``, or a sentence-transformers Transformer module's."""
    modules_file = path / "modules.json"
    if modules_file.is_file():
        for module in json.loads(modules_file.read_text(encoding="utf-8")):
            if str(module.get("type", "")).endswith("Transformer"):
                return path / module.get("path", "")
    return path


def _load_adapter_merged(adapter: Path, base: Path, *, dtype: Any, allow_pickle: bool, remote: dict) -> Any:
    """The base as a bare AutoModel with the adapter folded in: each adapted weight becomes ``W + Psi``, computed in
    fp32 from the stored base weight by the fold merge uses (`reforge.io.adapter`), then rounded to ``dtype`` once.
    The adapter is checked against the base as merge checks it (`open_adapter`)."""
    import torch
    from transformers import AutoModel

    from reforge.io.keymap import detect_layout

    model = AutoModel.from_pretrained(base, dtype=dtype, weights_only=True, **remote)
    checkpoint, adapter = _open_adapter(adapter, base, allow_pickle=allow_pickle)
    params = dict(model.named_parameters())
    layout = detect_layout(params)
    loaded = {layout.canonical(name): param for name, param in params.items()}
    stored = checkpoint.canonical_keys()
    lacking = sorted(set(adapter.modules) - set(loaded))
    if lacking:
        raise AdapterError(
            f"Adapter {short_path(adapter.checkpoint.path)} adapts {lacking[0]!r}, which {short_path(base)} loaded "
            f"as a bare {type(model).__name__} does not have ({len(lacking)} such tensor(s)).",
            hint="Check --base (or base_model_name_or_path in adapter_config.json).",
            path=adapter.checkpoint.path,
            tensor=lacking[0],
        )
    with checkpoint.reader() as base_reader, adapter.checkpoint.reader() as adapter_reader, torch.no_grad():
        for target in sorted(adapter.modules):
            weight = base_reader.get(stored[target]).float()
            folded = adapter.psi(target, adapter_reader.get, weight)
            loaded[target].copy_(folded.add_(weight))  # W + Psi in fp32, rounded once
    return model


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _tokenizer_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()[:32]


def _resolve_local(ref: str, *, token: str | None, allow_pickle: bool) -> Path:
    """A local folder for ``ref`` (Hub ids are downloaded by `reforge.io.checkpoint.resolve_local`)."""
    from reforge.io.checkpoint import resolve_local

    return Path(resolve_local(ref, token=token, allow_pickle=allow_pickle))


def _content_key(path: Path) -> str:
    """`reforge.io.checkpoint.content_key` of the folder, and of its sentence-transformers module folders."""
    from reforge.io.checkpoint import content_key

    value = content_key(path)
    for folder in _module_dirs(path):  # the Transformer's weights and any Dense module's
        value = hashlib.sha256(f"{value}+{content_key(folder)}".encode()).hexdigest()
    return value


def _open_adapter(adapter: Path, base: Path, *, allow_pickle: bool) -> tuple[Any, Any]:
    """The base checkpoint and the adapter opened over it, with the checks merge and inspect make
    (`reforge.io.adapter.open_adapter`): its training record names this base, its tensors are LoRA factors, and it
    adapts tensors the base has, with factors of their shapes."""
    from reforge.io.adapter import open_adapter
    from reforge.io.checkpoint import open_model

    checkpoint = open_model(base, allow_pickle=allow_pickle)
    shapes = {key: checkpoint.index.tensors[stored].shape for key, stored in checkpoint.canonical_keys().items()}
    return checkpoint, open_adapter(adapter, checkpoint, shapes, allow_pickle=allow_pickle)


def check_finite(module: Any, name: str) -> None:
    """Refuse weights holding NaN or Inf (every score would be 0.0, or a sort of NaNs, and still exit 0).

    Raises:
        NonFiniteError: naming the first parameter or buffer that is not finite, and the model.
    """
    import torch

    from reforge.io.tensors import first_non_finite

    if isinstance(module, torch.nn.Module):
        groups = (("parameter", module.named_parameters()), ("buffer", module.named_buffers()))
    else:  # a post-pooling step (pooling.Dense, Normalize): its tensors are plain fields
        groups = (("parameter", ((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor))),)
    for kind, tensors in groups:
        tensor_name = first_non_finite(tensors)
        if tensor_name is not None:
            raise NonFiniteError(
                f"{name}: {kind} {tensor_name!r} holds NaN or Inf; its vectors and scores would mean nothing.",
                hint="Evaluate a model whose weights are finite (`reforge verify` names every such tensor).",
                tensor=tensor_name,
                path=None,
            )


def _module_dirs(path: Path) -> list[Path]:
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return []
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except ValueError:
        return []
    folders = [path / str(m.get("path", "")) for m in modules if isinstance(m, dict)]
    return [f for f in folders if f.is_dir() and f.resolve() != path.resolve()]
