"""Encoding profiles: how a retriever turns queries and passages into vectors (prefixes, pooling, length, EOS).

A profile is picked from the model's files (`detect_profile`), then any option the user gave overrides its fields
(`apply_overrides`). Detection, first match wins:

1. ``reforge_encoding.json`` in the model folder: a saved profile (`save_profile`), e.g. written next to a merge.
2. "e5-mistral" in the model's name (folder, Hub id or config ``_name_or_path``): the e5-mistral profile.
3. "repllama" in the name, or a peft adapter whose base is a Llama: the RepLLaMA profile.
4. ``modules.json`` (a sentence-transformers folder): its pooling, Normalize module, ``max_seq_length``,
   lower-casing and ``query`` / ``document`` prompts.
5. A decoder LM (Llama, Mistral, Qwen2, ...; also behind an adapter): last-token pooling, EOS appended, normalized.
6. Anything else (e.g. a bare BERT without sentence-transformers files): the pooling is unknown, and
   `PoolingUndeterminedError` asks for ``--pooling``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from reforge.errors import InvalidOptionError, PoolingUndeterminedError, short_path
from reforge.io.st_folder import Encoding

POOLINGS = ("mean", "cls", "last")
PROFILE_NAMES = ("sentence-transformers", "repllama", "e5-mistral", "last-token", "custom")
PROFILE_FILE = "reforge_encoding.json"

E5_QUERY_TEMPLATE = "Instruct: {task}\nQuery: "

# Task instructions of e5-mistral-7b-instruct for the BEIR datasets (microsoft/unilm e5/utils.py), keyed by the
# dataset name with everything but letters and digits removed, lower-cased. Longest key that starts the name wins.
E5_TASKS: dict[str, str] = {
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "nfcorpus": "Given a question, retrieve relevant documents that best answer the question",
    "arguana": "Given a claim, find documents that refute the claim",
    "fiqa": "Given a financial question, retrieve user replies that best answer the question",
    "scidocs": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "treccovid": "Given a query on COVID-19, retrieve documents that answer the query",
    "msmarco": "Given a web search query, retrieve relevant passages that answer the query",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question",
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "climatefever": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "dbpedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "quora": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "touche": "Given a question, retrieve detailed and persuasive arguments that answer the question",
    "webistouche": "Given a question, retrieve detailed and persuasive arguments that answer the question",
}

DECODER_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo",
    "olmo2",
    "gpt_neox",
    "falcon",
    "starcoder2",
    "smollm3",
)


@dataclass(frozen=True)
class EncodingProfile:
    """Everything that decides a text's vector besides the weights.

    Fields:
        name: which convention this follows (one of `PROFILE_NAMES`).
        pooling: ``mean`` (over non-pad tokens), ``cls`` (first token) or ``last`` (last non-pad token).
        normalize: L2-normalize vectors (then inner product = cosine).
        max_length: tokens per text, special tokens and an appended EOS included.
        query_prefix / passage_prefix: text put before each query / passage. A query prefix may hold ``{task}``,
            filled per dataset from `E5_TASKS` (or from ``task``).
        append_eos: add the tokenizer's EOS after truncation (unless the tokenizer already ended with it).
        lowercase: lower-case texts before tokenizing (sentence-transformers ``do_lower_case``).
        title_separator: between a document's title and text.
        task: the task text for ``{task}``; None = look it up by dataset name.
    """

    name: str
    pooling: str
    normalize: bool
    max_length: int
    query_prefix: str = ""
    passage_prefix: str = ""
    append_eos: bool = False
    lowercase: bool = False
    title_separator: str = " "
    task: str | None = None

    def query_prefix_for(self, dataset: str) -> str:
        """The query prefix with ``{task}`` filled for ``dataset``.

        Raises:
            InvalidOptionError: the prefix needs a task and none is known for this dataset name.
        """
        if "{task}" not in self.query_prefix:
            return self.query_prefix
        task = self.task or e5_task(dataset)
        if task is None:
            raise InvalidOptionError(
                f"The {self.name} profile needs a task instruction for dataset {dataset!r}, and none is known "
                f"(known: {', '.join(sorted(E5_TASKS))}).",
                hint="Pass --query-prefix 'Instruct: <your task>\\nQuery: ' (or --task '<your task>').",
                option="--query-prefix",
            )
        return self.query_prefix.replace("{task}", task)

    def passage_settings(self) -> dict[str, Any]:
        """The fields that change passage vectors (part of the embedding cache key)."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "query_prefix", "task")}

    def to_dict(self) -> dict[str, Any]:
        """All fields, for JSON."""
        return asdict(self)


def e5_task(dataset: str) -> str | None:
    """e5-mistral's BEIR task instruction for a dataset name (``scifact``, ``nfcorpus-partial``, ...), or None."""
    key = re.sub(r"[^a-z0-9]", "", dataset.lower())
    for name in sorted(E5_TASKS, key=len, reverse=True):
        if key.startswith(name):
            return E5_TASKS[name]
    return None


def builtin_profile(name: str, *, max_length: int | None = None) -> EncodingProfile:
    """The named built-in profile (``repllama``, ``e5-mistral``, ``last-token``)."""
    if name == "repllama":
        return EncodingProfile("repllama", "last", True, max_length or 512, "query: ", "passage: ", append_eos=True)
    if name == "e5-mistral":
        return EncodingProfile("e5-mistral", "last", True, max_length or 512, E5_QUERY_TEMPLATE, "", append_eos=True)
    if name == "last-token":
        return EncodingProfile("last-token", "last", True, max_length or 512, append_eos=True)
    raise InvalidOptionError(f"Unknown profile {name!r}; choose one of {', '.join(PROFILE_NAMES)}.", option="--profile")


def detect_profile(
    model_dir: str | Path,
    *,
    name: str = "",
    base_dir: str | Path | None = None,
    profile: str | None = None,
    pooling: str | None = None,
) -> EncodingProfile:
    """Pick the encoding profile of a model folder (see the module docstring for the order).

    Args:
        model_dir: the model (or adapter) folder.
        name: how the user named the model (Hub id or path), searched for "e5-mistral" / "repllama".
        base_dir: for an adapter, the base model's folder (its config says the architecture).
        profile: a profile name the user chose; skips detection (``sentence-transformers`` reads the folder).
        pooling: the user's ``--pooling``; lets a model of unknown kind use the ``custom`` profile.

    Raises:
        PoolingUndeterminedError: nothing tells how to pool and ``pooling`` was not given.
    """
    model_dir = Path(model_dir)
    config = _read_json(Path(base_dir) / "config.json") if base_dir else _read_json(model_dir / "config.json")
    max_positions = config.get("max_position_embeddings")
    if profile is not None:
        if profile == "sentence-transformers":
            return sentence_transformers_profile(model_dir)
        if profile == "custom":
            return _custom(pooling, max_positions, model_dir)
        return builtin_profile(profile)
    if (model_dir / PROFILE_FILE).is_file():
        return load_profile(model_dir / PROFILE_FILE)
    kind = _kind_from_name(name or str(model_dir), config)
    if kind is not None:
        return builtin_profile(kind)
    if (model_dir / "modules.json").is_file():
        return sentence_transformers_profile(model_dir)
    model_type = str(config.get("model_type", "")).lower()
    is_adapter = (model_dir / "adapter_config.json").is_file()
    if is_adapter and model_type == "llama":
        return builtin_profile("repllama")
    if model_type in DECODER_TYPES:
        return builtin_profile("last-token")
    if pooling is not None:
        return _custom(pooling, max_positions, model_dir)
    raise PoolingUndeterminedError(
        f"Cannot tell how to pool {short_path(model_dir)}: it is not a sentence-transformers folder (no "
        f"modules.json), not a known retriever and not a decoder LM (model_type {model_type or 'unknown'!r}).",
        hint="Pass --pooling mean|cls|last (and --query-prefix / --passage-prefix if the model expects them).",
        path=model_dir,
        model_type=model_type or None,
    )


def apply_overrides(profile: EncodingProfile, **overrides: Any) -> EncodingProfile:
    """``profile`` with every override that is not None applied (``pooling``, ``max_length``, ``query_prefix``, ...).

    Raises:
        InvalidOptionError: a pooling that is not mean/cls/last, or a max length below 2.
    """
    valid = {f.name for f in fields(EncodingProfile)}
    changes = {k: v for k, v in overrides.items() if v is not None and k in valid}
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"unknown profile fields: {sorted(unknown)}")
    if "pooling" in changes and changes["pooling"] not in POOLINGS:
        raise InvalidOptionError(
            f"Pooling {changes['pooling']!r} is not supported; use mean, cls or last.", option="--pooling"
        )
    if "max_length" in changes and changes["max_length"] < 2:
        raise InvalidOptionError(
            f"--max-length must be at least 2, got {changes['max_length']}.", option="--max-length"
        )
    return replace(profile, **changes) if changes else profile


def sentence_transformers_profile(model_dir: str | Path) -> EncodingProfile:
    """The profile a sentence-transformers folder describes (modules.json, pooling config, prompts).

    Raises:
        PoolingUndeterminedError: the folder has no Pooling module, or one with a mode reforge does not implement.
    """
    model_dir = Path(model_dir)
    modules = _read_json(model_dir / "modules.json", default=[])
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    pooling_module = types.get("Pooling")
    if pooling_module is None:
        raise PoolingUndeterminedError(
            f"{short_path(model_dir)}/modules.json has no Pooling module.",
            hint="Pass --pooling mean|cls|last.",
            path=model_dir,
            model_type=None,
        )
    pool_config = _read_json(model_dir / pooling_module.get("path", "1_Pooling") / "config.json")
    modes = [
        mode
        for mode, key in (
            ("mean", "pooling_mode_mean_tokens"),
            ("cls", "pooling_mode_cls_token"),
            ("last", "pooling_mode_lasttoken"),
        )
        if pool_config.get(key)
    ]
    others = [
        k
        for k, v in pool_config.items()
        if k.startswith("pooling_mode")
        and v
        and k not in ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_lasttoken")
    ]
    if len(modes) != 1 or others or pool_config.get("include_prompt") is False:
        raise PoolingUndeterminedError(
            f"{short_path(model_dir)} pools with {', '.join(modes + others) or 'no mode'}"
            f"{' excluding the prompt' if pool_config.get('include_prompt') is False else ''}; reforge implements "
            f"exactly one of mean, cls or last token.",
            hint="Pass --pooling mean|cls|last to choose one.",
            path=model_dir,
            model_type=None,
        )
    sbert = _read_json(model_dir / "sentence_bert_config.json")
    config = _read_json(model_dir / "config.json")
    max_length = sbert.get("max_seq_length") or min(int(config.get("max_position_embeddings", 512)), 512)
    prompts = _read_json(model_dir / "config_sentence_transformers.json").get("prompts") or {}
    passage_prompt = next((prompts[k] for k in ("document", "passage", "corpus") if prompts.get(k)), "")
    return EncodingProfile(
        "sentence-transformers",
        modes[0],
        "Normalize" in types,
        int(max_length),
        query_prefix=prompts.get("query", "") or "",
        passage_prefix=passage_prompt,
        lowercase=bool(sbert.get("do_lower_case", False)),
    )


def st_prompts(profile: EncodingProfile) -> dict[str, str]:
    """The sentence-transformers ``prompts`` of ``profile``: ``query`` and ``document``, plus one per dataset of
    `E5_TASKS` when the query prefix holds ``{task}`` and no fixed task is set (``query`` then uses MS MARCO's
    web-search instruction)."""
    template = profile.query_prefix
    if "{task}" not in template:
        return {"query": template, "document": profile.passage_prefix}
    prompts = {"query": template.replace("{task}", profile.task or E5_TASKS["msmarco"]),
               "document": profile.passage_prefix}
    if profile.task is None:
        prompts.update({name: template.replace("{task}", task) for name, task in E5_TASKS.items()})
    return prompts


def st_encoding(profile: EncodingProfile) -> Encoding:
    """``profile`` as the plain values `reforge.io.st_folder` writes into a sentence-transformers folder."""
    return Encoding(profile.pooling, profile.normalize, profile.max_length, append_eos=profile.append_eos,
                    lowercase=profile.lowercase, prompts=st_prompts(profile))


def save_profile(folder: str | Path, profile: EncodingProfile) -> Path:
    """Write ``profile`` as ``reforge_encoding.json`` in ``folder`` (read first by `detect_profile`)."""
    path = Path(folder) / PROFILE_FILE
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def load_profile(path: str | Path) -> EncodingProfile:
    """Read a profile written by `save_profile`.

    Raises:
        InvalidOptionError: the file is not a valid profile.
    """
    data = _read_json(Path(path))
    try:
        profile = EncodingProfile(**data)
    except TypeError as e:
        raise InvalidOptionError(
            f"{short_path(path)} is not a valid encoding profile ({e}).",
            hint="Delete it or pass --profile.",
            option="--profile",
        ) from e
    return apply_overrides(profile, pooling=profile.pooling)


def _custom(pooling: str | None, max_positions: Any, model_dir: Path) -> EncodingProfile:
    if pooling is None:
        raise PoolingUndeterminedError(
            f"The custom profile for {short_path(model_dir)} needs a pooling.",
            hint="Pass --pooling mean|cls|last.",
            path=model_dir,
            model_type=None,
        )
    profile = EncodingProfile("custom", "mean", False, min(int(max_positions or 512), 512))
    return apply_overrides(profile, pooling=pooling)


def _kind_from_name(name: str, config: dict) -> str | None:
    text = f"{name} {config.get('_name_or_path', '')}".lower()
    if "e5-mistral" in text or "e5_mistral" in text:
        return "e5-mistral"
    if "repllama" in text:
        return "repllama"
    return None


def _read_json(path: Path, default: Any = None) -> Any:
    if not path.is_file():
        return {} if default is None else default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InvalidOptionError(f"{short_path(path)} is not valid JSON ({e}).", option=None) from e
