"""The small files that travel with weights: config, tokenizer, sentence-transformers modules.

A merged retriever must load exactly where the original loads, so these are copied from the retriever (or, for a
peft LoRA retriever, from its base, with the config turned into the bare model's)."""

from __future__ import annotations

import json
import re
from pathlib import Path

WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".onnx",
    ".gguf",
    ".h5",
    ".msgpack",
    ".ot",
    ".index.json",
)
SKIPPED_NAMES = {"README.md", "reforge.json", ".gitattributes", "training_record.json", "adapter_config.json"}
SKIPPED_DIRS = {"onnx", "openvino", ".cache", ".git"}
MAX_COMPANION_BYTES = 64 * 2**20


def companion_files(folder: str | Path) -> dict[str, bytes]:
    """``{relative path: content}`` of the non-weight files in a checkpoint folder (two levels deep)."""
    folder = Path(folder)
    found: dict[str, bytes] = {}
    for path in sorted(folder.glob("*")) + sorted(folder.glob("*/*")):
        relative = path.relative_to(folder)
        if (
            not path.is_file()
            or path.name in SKIPPED_NAMES
            or path.name.endswith(WEIGHT_SUFFIXES)
            or relative.parts[0] in SKIPPED_DIRS
            or path.name.startswith(".")
            or path.stat().st_size > MAX_COMPANION_BYTES
        ):
            continue
        found[str(relative)] = path.read_bytes()
    return found


def bare_config(config: dict) -> dict:
    """A head model's config turned into its bare model's: ``LlamaForCausalLM`` -> ``LlamaModel``,
    ``BertForMaskedLM`` / ``XLMRobertaForMaskedLM`` / ``ModernBertForMaskedLM`` -> ``...Model``, ``GPT2LMHeadModel``
    -> ``GPT2Model``. The weights reforge writes for a retriever have no head, so the config must not promise one."""
    bare = dict(config)
    architectures = [re.sub(r"(For[A-Z]\w*|LMHeadModel)$", "Model", a) for a in config.get("architectures") or []]
    if architectures:
        bare["architectures"] = architectures
    return bare


def output_companions(
    retriever_folder: Path,
    retriever_config: dict | None,
    *,
    from_base: Path | None = None,
    base_config: dict | None = None,
    keep_head: bool = False,
) -> dict[str, bytes]:
    """The companion files of a merged or delta output in the retriever's layout.

    For a full retriever: its own files, with a bare-model config unless ``keep_head`` (RE-Adapt of a chat model
    writes a CausalLM). For a peft LoRA retriever (``from_base`` given): the base's files with a bare-model config,
    overlaid by any tokenizer or sentence-transformers files the adapter folder carries.
    """
    if from_base is None:
        files = companion_files(retriever_folder)
        bare = bare_config(retriever_config or {})
        if retriever_config and not keep_head and bare.get("architectures") != retriever_config.get("architectures"):
            files["config.json"] = (json.dumps(bare, indent=2) + "\n").encode()
        return files
    files = companion_files(from_base)
    files.pop("generation_config.json", None)
    files.update(companion_files(retriever_folder))
    if base_config is not None:
        files["config.json"] = json.dumps(bare_config(base_config), indent=2).encode()
    return files
