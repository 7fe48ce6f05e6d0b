"""What a merge writes beside its tensors: the ``reforge.json`` manifest (inputs, weights, the command), the
retriever's companion files (config, tokenizer, sentence-transformers files), the encoding profile that `reforge
eval` reads first, and the model card."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from reforge.card import render_chat_card
from reforge.io.adapter import LoraAdapter
from reforge.io.companions import companion_files, output_companions
from reforge.io.manifest import read_training_record
from reforge.io.paths import located_inputs
from reforge.io.writer import CheckpointWriter
from reforge.ops.delta import RETRIEVER_FILES
from reforge.ops.merge_inputs import MergeInputs

if TYPE_CHECKING:
    from reforge.profiles import EncodingProfile


def merge_manifest(
    source: MergeInputs, beta: float, dtype: str, command: str | None, corpus: str | None, keep_lm_head: bool = False
) -> dict:
    """The manifest of a merge (`reforge.ops.job.writing` records it): its inputs' provenance, alphas, beta, dtype
    and command. ``corpus`` names what the adapters were trained on (default: their training records)."""
    retriever = (
        source.retriever.provenance
        if source.retriever
        else source.retriever_adapter.checkpoint.provenance
        if source.retriever_adapter
        else source.delta.manifest.get("retriever")
    )
    manifest = {
        "kind": "merge",
        "base": source.base.provenance,
        "retriever": retriever,
        "delta": {
            "path": str(source.delta.path.resolve()),
            "plan_id": source.delta.manifest.get("plan_id"),
            "max_abs_rounding": source.delta.manifest.get("max_abs_rounding"),
        }
        if source.delta
        else None,
        "adapters": [
            {**a.checkpoint.provenance, "alpha": alpha, "dora": a.is_dora, "corpus": corpus or _adapter_corpus(a)}
            for a, alpha in source.adapters
        ],
        "beta": beta,
        "dtype": dtype,
        "command": command,
    }
    if keep_lm_head:
        manifest["keep_lm_head"] = True
    return manifest


def _adapter_corpus(adapter: LoraAdapter) -> str | None:
    """What the adapter was trained on (its training record's corpus), its files' paths absolute again: the record
    names them relative to the adapter's folder and `reforge.io.paths.located_inputs` reads them back; this
    manifest names them relative to its own folder (`reforge.io.paths.recorded_inputs`)."""
    folder = adapter.checkpoint.path
    record = read_training_record(folder)
    return None if record is None else replace(record, data=located_inputs(record.data, folder)).corpus


def add_companions(writer: CheckpointWriter, source: MergeInputs, manifest: dict, keep_head: bool = False) -> None:
    """Add every file of the merged folder but its tensors and ``reforge.json``: the retriever's companions, and
    (a retriever) its encoding profile and sentence-transformers files, or (``keep_head``, a chat model) none; and
    the card."""
    if source.delta is not None:
        folder, base_dir = source.delta.path / RETRIEVER_FILES, None
        files = companion_files(folder)
    elif source.retriever_adapter is not None:
        folder, base_dir = source.retriever_adapter.checkpoint.path, source.base.path
        files = output_companions(folder, None, from_base=source.base.path, base_config=source.base.config)
    else:
        folder, base_dir = source.retriever.path, None
        files = output_companions(folder, source.retriever.config, keep_head=keep_head)
    if keep_head:  # a chat model, not a retriever: no encoding profile, a card that says what it is
        for name, content in files.items():
            writer.add_file(name, content)
        writer.add_file("README.md", render_chat_card(manifest))
        return
    from reforge.profiles import PROFILE_FILE, profile_bytes

    profile = _encoding_profile(folder, str((manifest.get("retriever") or {}).get("ref") or folder), base_dir)
    encoding = profile.to_dict() if profile is not None else None
    if profile is not None and PROFILE_FILE not in files:  # read first by `reforge eval`
        files[PROFILE_FILE] = profile_bytes(profile)
    if profile is not None:  # a complete sentence-transformers folder that encodes like `reforge eval`
        files.update(_sentence_transformers_files(files, profile))
    for name, content in files.items():
        writer.add_file(name, content)
    prompts = json.loads(files.get("config_sentence_transformers.json", b"{}")).get("prompts") or {}
    writer.add_file(
        "README.md",
        _model_card({**manifest, "encoding": encoding, "prompt_names": sorted(prompts)}, "modules.json" in files),
    )


def _sentence_transformers_files(files: dict[str, bytes], profile: EncodingProfile) -> dict[str, bytes]:
    from reforge.io.st_folder import sentence_transformers_files
    from reforge.profiles import st_encoding

    return sentence_transformers_files(files, st_encoding(profile)).files


def _encoding_profile(folder: Path, name: str, base_dir: Path | None) -> EncodingProfile | None:
    """How the retriever encodes (prefixes, pooling, EOS), so the merged model is evaluated the same way: a merged
    RepLLaMA is a bare Llama whose name no longer says "repllama". None when it cannot be told."""
    from reforge.errors import ReforgeError
    from reforge.profiles import detect_profile

    try:
        return detect_profile(folder, name=name, base_dir=base_dir)
    except ReforgeError:
        return None


def _model_card(manifest: dict, sentence_transformers: bool) -> str:
    from reforge import __version__

    info = {
        **manifest,
        "reforge_version": __version__,
        "library_name": "sentence-transformers" if sentence_transformers else "transformers",
    }
    try:
        from reforge.card import render_model_card
    except ImportError:  # the card module is optional for merging
        return f"# Readapted retriever\n\nMade with reforge {__version__}.\n"
    return render_model_card(info)
