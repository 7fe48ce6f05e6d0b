"""The small files that travel with weights: config, tokenizer, sentence-transformers modules.

A merged retriever must load exactly where the original loads, so these are copied from the retriever (or, for a
peft LoRA retriever, from its base, with the config turned into the bare model's)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from reforge.io.paths import inside_checkpoint

# The files a model needs besides its weights (the set `reforge.io.hub` downloads): config, tokenizer, and the
# sentence-transformers description. Nothing else is copied: no custom code (*.py), no arbitrary folders.
COMPANION_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
    }
)
# sentence-transformers module folders (1_Pooling/, 2_Normalize/, 2_Dense/): their configs and vocabularies, and a
# Dense module's weights (safetensors only: a projection after pooling, never part of Delta or of a merge).
MODULE_FILE = re.compile(r"^\d+_[A-Za-z0-9_.-]+/([A-Za-z0-9_.-]+\.(json|txt|model)|model\.safetensors)$")
MAX_COMPANION_BYTES = 64 * 2**20


# Any one of these lets transformers' AutoTokenizer load a tokenizer from a folder (with its config.json).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a tokenizer of its own (`TOKENIZER_MARKERS`); the one rule eval and tune use to
    decide between a model's tokenizer and its base's."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_MARKERS)


def is_companion(relative: str) -> bool:
    """Whether a file at ``relative`` (POSIX, inside a checkpoint folder) travels with the weights."""
    return relative in COMPANION_NAMES or bool(MODULE_FILE.match(relative))


def companion_files(folder: str | Path) -> dict[str, bytes]:
    """``{relative path: content}`` of the companion files of a checkpoint folder (`is_companion`).

    Raises:
        UnsafePathError: a companion file is a symlink (or lies in a symlinked folder) that leaves the folder.
        CorruptCheckpointError: a companion name is a FIFO, device or folder.
    """
    folder = Path(folder)
    found: dict[str, bytes] = {}
    for path in sorted(folder.glob("*")) + sorted(folder.glob("*/*")):
        relative = path.relative_to(folder).as_posix()
        if not is_companion(relative) or not (path.exists() or path.is_symlink()):
            continue
        real = inside_checkpoint(folder, path, what="companion file")
        if real.stat().st_size > MAX_COMPANION_BYTES:
            continue
        found[relative] = real.read_bytes()
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
