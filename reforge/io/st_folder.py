"""The sentence-transformers files of a merged retriever, so that `SentenceTransformer(folder)` encodes exactly as
`reforge eval` does: pooling, normalization, prompts, max length, lower-casing and the EOS a profile appends.

reforge's own ``reforge_encoding.json`` is read only by reforge. These files say the same to sentence-transformers
(and so to MTEB): ``modules.json`` (Transformer, Pooling, Normalize), ``sentence_bert_config.json``
(``max_seq_length``, ``do_lower_case``), ``1_Pooling/config.json``, and ``config_sentence_transformers.json``
(``prompts``). An EOS appended by the profile goes into the saved tokenizer's post-processor, the way
Qwen3-Embedding ships it, so every loader of the tokenizer appends it after truncation. The tokenizer pads on the
profile's side, as reforge does.

`sentence_transformers_files` returns file contents; the caller writes them with its checkpoint writer.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
}
_ALL_POOLING_KEYS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


@dataclass(frozen=True)
class Encoding:
    """What decides a vector besides the weights, as plain values (`reforge.profiles.EncodingProfile` fills it).

    ``max_length`` counts every token, special tokens and the appended EOS included; ``prompts`` maps a prompt name
    (``query``, ``document``, a dataset for per-task instructions) to the text put before the input; ``modules``
    are steps after pooling (``normalize``; a ``dense:`` one only comes from a folder that has its own files)."""

    pooling: str
    normalize: bool
    max_length: int
    append_eos: bool = False
    lowercase: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    padding_side: str = "right"
    modules: tuple[str, ...] = ()


@dataclass
class StFiles:
    """The result: ``files`` to write (replacing companions of the same name), or ``skipped`` saying why none."""

    files: dict[str, bytes] = field(default_factory=dict)
    skipped: str | None = None


def sentence_transformers_files(companions: dict[str, bytes], encoding: Encoding) -> StFiles:
    """The files that make a folder holding ``companions`` (config.json, tokenizer files) a sentence-transformers
    model encoding like ``encoding``.

    A folder that already has ``modules.json`` keeps its own (the retriever's authors' configuration), and one
    whose tokenizer cannot be made to append EOS gets none: a loader would then encode differently.
    """
    if "modules.json" in companions:
        return StFiles(skipped="the retriever's own modules.json is kept")
    if encoding.pooling not in POOLING_KEYS:
        return StFiles(skipped=f"pooling {encoding.pooling!r} has no sentence-transformers module")
    if any(step != "normalize" for step in encoding.modules):
        return StFiles(skipped=f"modules {', '.join(encoding.modules)} need the retriever's own files")
    config = json.loads(companions.get("config.json", b"{}"))
    hidden = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    if not hidden or "tokenizer_config.json" not in companions:
        return StFiles(skipped="no hidden_size in config.json or no tokenizer")
    tokenizer, problem = _tokenizer_files(companions, encoding)
    if problem:
        return StFiles(skipped=problem)
    files = dict(tokenizer)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if encoding.normalize or "normalize" in encoding.modules:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    pooling = {
        "word_embedding_dimension": int(hidden),
        **{k: False for k in _ALL_POOLING_KEYS},
        POOLING_KEYS[encoding.pooling]: True,
        "include_prompt": True,
    }
    files["modules.json"] = _json(modules)
    files["sentence_bert_config.json"] = _json(
        {"max_seq_length": encoding.max_length, "do_lower_case": encoding.lowercase}
    )
    files["1_Pooling/config.json"] = _json(pooling)
    files["config_sentence_transformers.json"] = _json(
        {
            "prompts": dict(encoding.prompts),
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if encoding.normalize else "dot",
        }
    )
    return StFiles(files)


def _tokenizer_files(companions: dict[str, bytes], encoding: Encoding) -> tuple[dict[str, bytes], str | None]:
    """tokenizer.json / tokenizer_config.json padding on the profile's side, with a pad token, appending EOS if asked;
    checked by loading them back with transformers."""
    tokenizer_config = json.loads(companions["tokenizer_config.json"])
    tokenizer_config["padding_side"] = encoding.padding_side
    tokenizer_config["model_max_length"] = encoding.max_length  # where sentence-transformers 6 keeps it
    files: dict[str, bytes] = {}
    eos = _token_text(tokenizer_config.get("eos_token"))
    if tokenizer_config.get("pad_token") is None and eos is not None:
        tokenizer_config["pad_token"] = eos  # reforge pads with EOS when there is no pad token
    if encoding.append_eos:
        if eos is None or "tokenizer.json" not in companions:
            return {}, "the profile appends EOS and the tokenizer has no eos_token or no tokenizer.json"
        tokenizer_json = json.loads(companions["tokenizer.json"])
        eos_id = _token_id(tokenizer_json, eos)
        if eos_id is None:
            return {}, f"EOS {eos!r} is not in tokenizer.json's vocabulary"
        tokenizer_json["post_processor"] = with_eos(tokenizer_json.get("post_processor"), eos, eos_id)
        tokenizer_config["add_eos_token"] = True  # tokenizer classes that rebuild the post-processor from flags
        files["tokenizer.json"] = json.dumps(tokenizer_json, ensure_ascii=False, indent=2).encode()
    files["tokenizer_config.json"] = _json(tokenizer_config)
    problem = _check_tokenizer({**companions, **files}, encoding, eos)
    return ({}, problem) if problem else (files, None)


def with_eos(post_processor: dict | None, eos: str, eos_id: int) -> dict:
    """A tokenizers post-processor (as JSON) that does what ``post_processor`` did, then appends ``eos``.

    Example:
        >>> with_eos(None, "</s>", 2)["single"]
        [{'Sequence': {'id': 'A', 'type_id': 0}}, {'SpecialToken': {'id': '</s>', 'type_id': 0}}]
    """
    piece = {"SpecialToken": {"id": eos, "type_id": 0}}
    special = {eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}}
    if post_processor is None:
        return {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, piece],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                piece,
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": eos, "type_id": 1}},
            ],
            "special_tokens": special,
        }
    kind = post_processor.get("type")
    if kind == "TemplateProcessing":
        updated = dict(post_processor)
        if updated["single"][-1] != piece:
            updated["single"] = [*updated["single"], piece]
            updated["pair"] = [*updated["pair"], {"SpecialToken": {"id": eos, "type_id": 1}}]
        updated["special_tokens"] = {**updated.get("special_tokens", {}), **special}
        return updated
    if kind == "Sequence":
        steps = list(post_processor["processors"])
        at = next((i for i, p in enumerate(steps) if p.get("type") == "TemplateProcessing"), None)
        if at is None:
            steps.append(with_eos(None, eos, eos_id))
        else:
            steps[at] = with_eos(steps[at], eos, eos_id)
        return {**post_processor, "processors": steps}
    return {"type": "Sequence", "processors": [post_processor, with_eos(None, eos, eos_id)]}


def _check_tokenizer(files: dict[str, bytes], encoding: Encoding, eos: str | None) -> str | None:
    """Load the tokenizer the folder will hold; None if it appends EOS exactly as asked and pads on the right."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name in _TOKENIZER_FILES:
            if name in files:
                Path(tmp, name).write_bytes(files[name])
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError, TypeError) as e:
            return f"the tokenizer does not load ({e})"
    if tokenizer.padding_side != encoding.padding_side or tokenizer.pad_token_id is None:
        return f"the tokenizer does not pad on the {encoding.padding_side} with a pad token"
    if not encoding.append_eos:
        return None
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    cut = tokenizer("a b " * encoding.max_length, truncation=True, max_length=encoding.max_length)["input_ids"]
    if (
        full[-1:] != [eos_id]
        or full[-2:-1] == [eos_id]
        or plain[-1:] == [eos_id]
        or cut[-1:] != [eos_id]
        or len(cut) != encoding.max_length
    ):
        return "the tokenizer could not be made to append EOS exactly once"
    return None


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _token_id(tokenizer_json: dict, token: str) -> int | None:
    for added in tokenizer_json.get("added_tokens") or []:
        if added.get("content") == token:
            return int(added["id"])
    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    return vocab.get(token) if isinstance(vocab, dict) else None


def _json(data) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
