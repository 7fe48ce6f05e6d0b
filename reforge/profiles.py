"""Encoding profiles: how a retriever turns queries and passages into vectors (prefixes, pooling, length, EOS).

A profile is picked from the model's files (`detect_profile`), then any option the user gave overrides its fields
(`apply_overrides`). Detection, first match wins:

1. ``reforge_encoding.json`` in the model folder: a saved profile (`save_profile`), e.g. written next to a merge.
2. A known retriever's name in the model's name (folder, Hub id or config ``_name_or_path``): e5-mistral,
   Qwen3-Embedding, gte-Qwen2-instruct, bge-multilingual-gemma2, Linq-Embed-Mistral, SFR-Embedding-Mistral
   (`NAMED_PROFILES`), each with its authors' prompt format, pooling, padding side and length.
3. "repllama" in the name, or a peft adapter whose base is a Llama: the RepLLaMA profile.
4. ``modules.json`` (a sentence-transformers folder): encoded as sentence-transformers would: its pooling (old
   ``pooling_mode_*`` booleans or the newer ``pooling_mode``), Dense and Normalize modules in order,
   ``max_seq_length``, lower-casing and prompts (``query`` / ``document``, else ``default_prompt_name``). A module
   reforge does not implement is an error, never skipped.
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

from reforge.errors import InvalidOptionError, PoolingUndeterminedError, UnsupportedModelError, short_path
from reforge.io.st_folder import Encoding

POOLINGS = ("mean", "cls", "last", "max", "mean_sqrt_len", "weightedmean")
PROFILE_FILE = "reforge_encoding.json"  # a saved profile: written by `profile_bytes` only, read by `load_profile`

E5_QUERY_TEMPLATE = "Instruct: {task}\nQuery: "
QWEN3_QUERY_TEMPLATE = "Instruct: {task}\nQuery:"  # no space after "Query:" (Qwen3-Embedding's model card)
BGE_GEMMA2_QUERY_TEMPLATE = "<instruct>{task}\n<query>"

# sentence-transformers' pooling names (new ``pooling_mode`` values and old ``pooling_mode_*`` keys) -> reforge's
ST_POOLING_MODES = {
    "mean": "mean",
    "cls": "cls",
    "lasttoken": "last",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weightedmean",
}
ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
# Modules after pooling that reforge applies; anything else in modules.json is refused.
ST_INPUT_MODULES = ("Transformer",)

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

# Retrievers known by name: (name fragments, profile fields). Sources are cited in docs/eval.md
# ("Encoding profiles: sources"). Instruction models take the task text of `E5_TASKS` for the BEIR datasets.
NAMED_PROFILES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "e5-mistral": (
        ("e5-mistral", "e5_mistral"),
        dict(pooling="last", normalize=True, max_length=512, query_prefix=E5_QUERY_TEMPLATE, append_eos=True),
    ),
    "qwen3-embedding": (
        ("qwen3-embedding", "qwen3_embedding"),
        dict(
            pooling="last",
            normalize=True,
            max_length=8192,
            query_prefix=QWEN3_QUERY_TEMPLATE,
            padding_side="left",
        ),
    ),
    "gte-qwen2": (
        ("gte-qwen2", "gte_qwen2"),
        dict(pooling="last", normalize=True, max_length=8192, query_prefix=E5_QUERY_TEMPLATE),
    ),
    "bge-gemma2": (
        ("bge-multilingual-gemma2", "bge_multilingual_gemma2"),
        dict(pooling="last", normalize=True, max_length=4096, query_prefix=BGE_GEMMA2_QUERY_TEMPLATE),
    ),
    "linq-embed-mistral": (
        ("linq-embed-mistral", "linq_embed_mistral"),
        dict(pooling="last", normalize=True, max_length=4096, query_prefix=E5_QUERY_TEMPLATE, append_eos=True),
    ),
    "sfr-embedding-mistral": (
        ("sfr-embedding-mistral", "sfr_embedding_mistral", "sfr-embedding-2"),
        dict(pooling="last", normalize=True, max_length=4096, query_prefix=E5_QUERY_TEMPLATE, append_eos=True),
    ),
}
PROFILE_NAMES = ("sentence-transformers", "repllama", *NAMED_PROFILES, "last-token", "custom")

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
        padding_side: ``right`` or ``left`` (Qwen3-Embedding pads on the left, as its card does).
        modules: steps after pooling, in order (a sentence-transformers folder's): ``dense:<folder>`` applies the
            Dense module saved in that subfolder, ``normalize`` L2-normalizes. ``normalize`` above is applied last.
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
    padding_side: str = "right"
    modules: tuple[str, ...] = ()

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
        settings = {k: v for k, v in asdict(self).items() if k not in ("name", "query_prefix", "task")}
        for key, default in (("padding_side", "right"), ("modules", ())):  # keeps older cache keys valid
            if settings[key] == default:
                del settings[key]
        return settings

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
    """The named built-in profile (``repllama``, ``last-token`` or one of `NAMED_PROFILES`)."""
    if name == "repllama":
        return EncodingProfile("repllama", "last", True, max_length or 512, "query: ", "passage: ", append_eos=True)
    if name in NAMED_PROFILES:
        values = dict(NAMED_PROFILES[name][1])
        values["max_length"] = max_length or values["max_length"]
        return EncodingProfile(name, **values)
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
    if "pooling" in changes and not set(str(changes["pooling"]).split("+")) <= set(POOLINGS):
        raise InvalidOptionError(
            f"Pooling {changes['pooling']!r} is not supported; use mean, cls or last "
            f"(or {', '.join(POOLINGS[3:])}, or several joined by '+').",
            option="--pooling",
        )
    if changes.get("padding_side", "right") not in ("right", "left"):
        raise InvalidOptionError(f"padding_side must be right or left, got {changes['padding_side']!r}.", option=None)
    if "max_length" in changes and changes["max_length"] < 2:
        raise InvalidOptionError(
            f"--max-length must be at least 2, got {changes['max_length']}.", option="--max-length"
        )
    return replace(profile, **changes) if changes else profile


def sentence_transformers_profile(model_dir: str | Path) -> EncodingProfile:
    """The profile a sentence-transformers folder describes: modules.json, pooling config, prompts.

    Raises:
        PoolingUndeterminedError: the folder has no Pooling module.
        UnsupportedModelError: a module or pooling option reforge does not implement (never skipped).
    """
    model_dir = Path(model_dir)
    modules = _read_json(model_dir / "modules.json", default=[])
    if not isinstance(modules, list):
        raise UnsupportedModelError(
            f"{short_path(model_dir)}/modules.json is not a list of modules.", path=model_dir, reason="modules.json"
        )
    pooling, steps, normalize_last, transformer = None, [], False, model_dir
    for module in sorted(modules, key=lambda m: int(m.get("idx", 0))):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        folder = str(module.get("path", ""))
        if kind in ST_INPUT_MODULES and pooling is None and not steps:
            transformer = model_dir / folder
            continue
        if kind == "Pooling" and pooling is None:
            pooling = _st_pooling(model_dir, folder)
        elif kind == "Dense" and pooling is not None:
            steps.append(f"dense:{folder}")
        elif kind == "Normalize" and pooling is not None:
            steps.append("normalize")
        else:
            raise UnsupportedModelError(
                f"{short_path(model_dir)}/modules.json has a {module.get('type')!r} module "
                f"({folder or 'no folder'}) that reforge does not implement; it would encode differently from "
                f"sentence-transformers.",
                hint="Evaluate it with sentence-transformers, or remove the module if it is not wanted.",
                path=model_dir,
                reason=str(module.get("type")),
            )
    if pooling is None:
        raise PoolingUndeterminedError(
            f"{short_path(model_dir)}/modules.json has no Pooling module.",
            hint="Pass --pooling mean|cls|last.",
            path=model_dir,
            model_type=None,
        )
    if steps and steps[-1] == "normalize":
        steps.pop()
        normalize_last = True
    sbert = _read_json(transformer / "sentence_bert_config.json")
    max_length = sbert.get("max_seq_length") or _st_max_length(transformer)
    query_prefix, passage_prefix = st_prompts(_read_json(model_dir / "config_sentence_transformers.json"))
    return EncodingProfile(
        "sentence-transformers",
        pooling,
        normalize_last,
        int(max_length),
        query_prefix=query_prefix,
        passage_prefix=passage_prefix,
        lowercase=bool(sbert.get("do_lower_case", False)),
        modules=tuple(steps),
    )


def _st_max_length(transformer: Path) -> int:
    """sentence-transformers 6 keeps the length in the tokenizer: ``model_max_length`` capped at the model's
    ``max_position_embeddings``; with neither, 512 as before."""
    positions = _read_json(transformer / "config.json").get("max_position_embeddings")
    tokenizer_max = _read_json(transformer / "tokenizer_config.json").get("model_max_length")
    limits = [int(v) for v in (tokenizer_max, positions) if isinstance(v, (int, float)) and 0 < v < 10**9]
    if tokenizer_max is None or not limits:
        return min(int(positions or 512), 512)
    return min(limits)


def st_prompts(st_config: dict) -> tuple[str, str]:
    """(query prompt, document prompt) as sentence-transformers' ``encode_query`` / ``encode_document`` pick them:
    the ``query`` prompt, resp. the first of ``document``, ``passage``, ``corpus``; else ``default_prompt_name``'s."""
    prompts = st_config.get("prompts") or {}
    default = prompts.get(st_config.get("default_prompt_name") or "", None) or ""
    query = prompts["query"] if "query" in prompts else default
    passage = next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), default)
    return query or "", passage or ""


def _st_pooling(model_dir: Path, folder: str) -> str:
    """reforge's pooling for a sentence-transformers Pooling config (``pooling_mode`` or the old booleans)."""
    config = _read_json(model_dir / folder / "config.json")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in ST_POOLING_KEYS.items() if config.get(key)]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    unknown = [m for m in modes if m not in ST_POOLING_MODES]
    if not modes or unknown or config.get("include_prompt") is False:
        what = (
            "no pooling mode"
            if not modes
            else f"pooling mode {unknown[0]!r}"
            if unknown
            else "pooling that excludes the prompt (include_prompt false)"
        )
        raise UnsupportedModelError(
            f"{short_path(model_dir / folder)}/config.json asks for {what}, which reforge does not implement.",
            hint="Pass --pooling mean|cls|last to choose one yourself.",
            path=model_dir,
            reason=what,
        )
    return "+".join(ST_POOLING_MODES[m] for m in modes)


def st_folder_prompts(profile: EncodingProfile) -> dict[str, str]:
    """The ``prompts`` a sentence-transformers folder gets for ``profile``: ``query`` and ``document``, plus one per
    dataset of `E5_TASKS` when the query prefix holds ``{task}`` and no fixed task is set (``query`` then uses MS
    MARCO's web-search instruction)."""
    template = profile.query_prefix
    if "{task}" not in template:
        return {"query": template, "document": profile.passage_prefix}
    prompts = {
        "query": template.replace("{task}", profile.task or E5_TASKS["msmarco"]),
        "document": profile.passage_prefix,
    }
    if profile.task is None:
        prompts.update({name: template.replace("{task}", task) for name, task in E5_TASKS.items()})
    return prompts


def st_encoding(profile: EncodingProfile) -> Encoding:
    """``profile`` as the plain values `reforge.io.st_folder` writes into a sentence-transformers folder."""
    return Encoding(
        profile.pooling,
        profile.normalize,
        profile.max_length,
        append_eos=profile.append_eos,
        lowercase=profile.lowercase,
        prompts=st_folder_prompts(profile),
        padding_side=profile.padding_side,
        modules=tuple(profile.modules),
    )


def profile_bytes(profile: EncodingProfile) -> bytes:
    """The bytes of ``PROFILE_FILE`` for ``profile``: what `save_profile` writes and `reforge merge` puts in its
    output, so that every saved profile is spelled the same way."""
    return (json.dumps(profile.to_dict(), indent=2) + "\n").encode("utf-8")


def save_profile(folder: str | Path, profile: EncodingProfile) -> Path:
    """Write ``profile`` as ``PROFILE_FILE`` (``reforge_encoding.json``) in ``folder``, whole or not at all (read
    first by `detect_profile`)."""
    from reforge.io.atomic import write_atomic

    return write_atomic(Path(folder) / PROFILE_FILE, lambda f: f.write(profile_bytes(profile)))


def load_profile(path: str | Path) -> EncodingProfile:
    """Read a profile written by `save_profile`.

    Raises:
        InvalidOptionError: the file is not a valid profile.
    """
    data = _read_json(Path(path))
    try:
        if "modules" in data:
            data["modules"] = tuple(data["modules"])
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
    for kind, (fragments, _) in NAMED_PROFILES.items():
        if any(fragment in text for fragment in fragments):
            return kind
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
