"""README.md model cards, all rendered here: a readapted (merged) retriever, a knowledge adapter, a chat model.

`render_model_card` turns a plain dict (what `reforge merge` knows) into a card with YAML front matter built by
huggingface_hub's `ModelCardData` and a Markdown body: what was merged with which weights, the exact command, how to
load the model, and how to encode queries and passages. `render_adapter_card` writes the card of a `reforge train`
folder; `render_chat_card` the card of a chat model readapted with ``merge --keep-lm-head``.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePath
from typing import Any

from reforge.errors import InvalidOptionError

_TAGS = ["reforge", "re-adaptir", "retrieval", "feature-extraction", "dense-retrieval", "merge"]
_KINDS = {"dora": "DoRA", "lora": "LoRA", "rslora": "rsLoRA"}
_POOLING_TEXT = {
    "last": "the hidden state of the last token (append EOS; pad on the left or pick the last non-pad token)",
    "eos": "the hidden state of the final EOS token",
    "mean": "the mean of the token hidden states (padding masked out)",
    "cls": "the hidden state of the first ([CLS]) token",
}


def render_model_card(info: dict[str, Any]) -> str:
    """Render README.md for a merged retriever; keys that are missing or None are left out of the card.

    Args:
        info: a dict with these keys (only ``retriever`` is required):

            - ``retriever``, ``base``: a checkpoint record ``{"ref": str, "repo_id": str, "revision": str,
              "commit": str, "path": str, "fingerprint": str}`` (reforge's provenance record; all but ``ref`` or
              ``path`` optional). ``ref`` is a Hub id (``owner/name[@rev]``) or a local path; only Hub repos go
              into ``base_model``, local paths appear by folder name only.
            - ``delta``: the same, plus ``max_abs_rounding`` (float), when the merge read a stored Delta.
            - ``adapters``: list of checkpoint records plus ``"alpha": float, "corpus": str | None,
              "kind": "dora" | "lora" | None`` (or ``"dora": bool``), ``"rank": int | None, "steps": int | None``.
            - ``beta`` (float), ``dtype`` (str), ``reforge_version`` (str), ``command`` (str: the exact command).
            - ``library_name``: ``"transformers"`` (default) or ``"sentence-transformers"``.
            - ``pipeline_tag``: default ``"feature-extraction"``.
            - ``encoding``: ``{"query_prefix": str, "passage_prefix": str, "pooling": "last" | "eos" | "mean" |
              "cls", "normalize": bool, "append_eos": bool, "max_length": int}``.
            - ``prompt_names``: the ``prompts`` of the folder's config_sentence_transformers.json; with ``query``
              and ``document`` the snippet uses ``prompt_name``.
            - ``repo_id``: where the card will live (used in the loading snippets; default a placeholder).
            - ``model_name``: the card's title. ``license``, ``language``: copied to the metadata.
            - ``datasets``: Hub dataset ids of the adaptation corpora, for the metadata.
            - ``evaluation``: list of ``{"dataset": str, "metric": str, "value": float, "retriever_value": float}``.

    Returns:
        The card text: ``---`` YAML ``---`` then Markdown.

    Raises:
        InvalidOptionError: ``retriever`` or its ``ref`` is missing, or an alpha/beta is not a finite number.

    Example:
        >>> card = render_model_card({"retriever": {"ref": "intfloat/e5-mistral-7b-instruct"},
        ...                           "base": {"ref": "mistralai/Mistral-7B-v0.1"},
        ...                           "adapters": [{"ref": "psi/", "alpha": 0.5, "corpus": "scifact"}], "beta": 1.0})
        >>> "base_model_relation: merge" in card
        True
    """
    from huggingface_hub import ModelCard, ModelCardData

    retriever = _entry(info.get("retriever"))
    if not retriever.get("ref"):
        raise InvalidOptionError(
            "A model card needs the retriever it was made from (info['retriever']['ref']).",
            hint="Pass the retriever's Hub id or local path.",
            option="retriever",
        )
    base = _entry(info.get("base"))
    adapters = [_entry(a) for a in info.get("adapters") or [] if a]
    beta = info.get("beta")
    numbers = [("beta", beta)] + [(f"alpha of adapter {i + 1}", a.get("alpha")) for i, a in enumerate(adapters)]
    for name, value in numbers:
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise InvalidOptionError(
                f"The model card's {name} is {value!r}, not a finite number.",
                hint="Pass the values the merge used.",
                option=name,
            )
    library = info.get("library_name") or "transformers"
    base_models = [r["repo_id"] for r in (retriever, base) if r.get("repo_id")]
    tags = list(_TAGS)
    if library == "sentence-transformers":
        tags += ["sentence-transformers", "sentence-similarity"]
    data = ModelCardData(
        base_model=base_models or None,
        library_name=library,
        pipeline_tag=info.get("pipeline_tag") or "feature-extraction",
        tags=tags,
        license=info.get("license"),
        language=info.get("language"),
        datasets=info.get("datasets"),
        base_model_relation="merge" if base_models else None,
    )
    body = "\n\n".join(
        section
        for section in (
            _intro(info, retriever, base, adapters, beta),
            _provenance(retriever, base, _entry(info.get("delta")), adapters),
            _recipe(adapters, beta, info),
            _evaluation(info.get("evaluation") or []),
            _usage(info, library),
            _encoding(info.get("encoding") or {}),
        )
        if section
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n"))


def render_adapter_card(record: dict[str, Any]) -> str:
    """README.md for a knowledge adapter folder written by `reforge train`, from its training record.

    Args:
        record: the ``training_record.json`` dict (``adapter``, ``base``, ``corpus``, ``tokens``, ``steps``,
            ``loss``, ``config``, ``reforge_version``).

    Returns:
        The card text: ``---`` YAML (``library_name: peft``, ``base_model`` for a Hub base) ``---`` then Markdown.

    Example:
        >>> card = render_adapter_card({"adapter": "dora", "base": {"ref": "HuggingFaceTB/SmolLM2-135M"},
        ...                             "config": {"r": 32, "lora_alpha": 64, "target_modules": ["q_proj"]}})
        >>> "base_model: HuggingFaceTB/SmolLM2-135M" in card
        True
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = _entry(record.get("base"))
    config = record.get("config") or {}
    kind = _KINDS.get(str(record.get("adapter") or "dora"), "DoRA")
    data = ModelCardData(
        base_model=base.get("repo_id"),
        library_name="peft",
        tags=["reforge", "re-adaptir", "knowledge-adapter", kind.lower()],
    )
    corpus = record.get("corpus") or {}
    corpora = ", ".join(f"`{_corpus(p)}`" for p in corpus.get("paths") or []) or "unlabeled text"
    facts = [
        f"{corpus['documents']:,} documents" if corpus.get("documents") is not None else None,
        f"{record['tokens']['trained']:,} tokens" if (record.get("tokens") or {}).get("trained") else None,
        f"{record['steps']:,} step{'s' if record['steps'] != 1 else ''}" if record.get("steps") else None,
        f"final loss {record['loss']['final']:.4f}" if (record.get("loss") or {}).get("final") else None,
    ]
    base_name = _name(base) if base.get("ref") else "its base LM"
    numbers = f" ({', '.join(f for f in facts if f)})" if any(facts) else ""
    ref = base.get("repo_id") or "BASE"
    body = "\n".join(
        [
            f"# {kind} knowledge adapter for {PurePath(str(base.get('ref', 'base')).rstrip('/')).name}",
            "",
            f"A RE-AdaptIR knowledge adapter (Fleshman & Van Durme): {kind} r {config.get('r')}, alpha "
            f"{config.get('lora_alpha', 0):g} on {', '.join(config.get('target_modules') or [])} of {base_name}, "
            f"trained by next-token prediction on {corpora}{numbers}.",
            "",
            "It is not a retriever by itself: add it to a dense retriever made from the same base LM.",
            "",
            "```bash",
            f"reforge merge --base {ref} --retriever RETRIEVER --adapter THIS_ADAPTER --alpha 0.5 -o readapted/",
            "```",
            "",
            "`training_record.json` holds every option, the data hashes and the loss history.",
            "",
            f"Made with reforge {record.get('reforge_version') or ''}".rstrip() + ".",
        ]
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n"))


def render_chat_card(manifest: dict[str, Any]) -> str:
    """README.md of a chat model readapted by ``reforge merge --keep-lm-head`` (RE-Adapt), not a retriever.

    Args:
        manifest: the merge manifest (what `render_model_card` takes): ``retriever`` (the instruction-tuned model)
            and ``base`` records (``repo_id`` or ``ref``), ``adapters`` (records with ``alpha``), ``beta``,
            ``command``.

    Returns:
        The card text: ``---`` YAML (``pipeline_tag: text-generation``, ``base_model`` for Hub inputs) ``---``
        then Markdown saying what it is, what it was made from and how to load it.

    Example:
        >>> card = render_chat_card({"retriever": {"repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        ...                          "base": {"repo_id": "HuggingFaceTB/SmolLM2-135M"}, "beta": 1.0})
        >>> "pipeline_tag: text-generation" in card and "- HuggingFaceTB/SmolLM2-135M" in card
        True
    """
    from reforge import __version__

    def name(record: dict | None) -> str:
        record = record or {}
        return str(record.get("repo_id") or record.get("ref") or "?")

    hub = [r["repo_id"] for r in (manifest.get("retriever") or {}, manifest.get("base") or {}) if r.get("repo_id")]
    adapters = manifest.get("adapters") or []
    terms = " + ".join(f"{a.get('alpha', 0):g} * Psi[{name(a)}]" for a in adapters) or "no knowledge adapter"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- reforge", "- re-adapt"]
    if hub:
        lines += ["base_model:", *[f"- {h}" for h in hub], "base_model_relation: merge"]
    lines += [
        "---",
        "",
        "# Readapted chat model (RE-Adapt)",
        "",
        f"An instruction-tuned causal LM readapted with reforge {__version__}: base + {terms} + "
        f"{manifest.get('beta', 1.0):g} * Delta, where Delta = instruct - base over every tensor, **lm_head "
        "included** (RE-Adapt, arXiv 2405.15007). It is a chat/generation model, not a retriever.",
        "",
        f"- Instruction-tuned model: `{name(manifest.get('retriever'))}`",
        f"- Base model: `{name(manifest.get('base'))}`",
        f"- Command: `{manifest.get('command') or 'reforge merge --keep-lm-head'}`",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _entry(raw: dict[str, Any] | None) -> dict[str, Any]:
    """A checkpoint record with ``ref`` (``path`` when no ref) and ``repo_id`` set only for Hub references.

    Accepts reforge's provenance records (``ref``, ``repo_id``, ``revision``, ``commit``, ``path``,
    ``fingerprint``) as well as bare ``{"ref": ...}`` dicts.
    """
    from reforge.io.hub import looks_like_repo_id

    entry = dict(raw or {})
    ref = entry.get("ref") or entry.get("path")
    if not ref:
        return entry
    entry["ref"] = str(ref)
    if (
        not entry.get("repo_id")
        and not entry.get("path")
        and looks_like_repo_id(entry["ref"])
        and not entry["ref"].startswith((".", "/", "~"))
    ):
        entry["repo_id"], _, at = entry["ref"].partition("@")
        entry["revision"] = entry.get("revision") or at or None
    return entry


def _name(entry: dict[str, Any]) -> str:
    """A Hub link for Hub ids; the folder name for local paths (the card is public, the user's paths are not)."""
    if entry.get("repo_id"):
        repo_id, revision, commit = entry["repo_id"], entry.get("revision"), entry.get("commit")
        at = f" @ `{revision}`" if revision else ""
        if commit and commit != revision:
            at += f" (commit `{str(commit)[:12]}`)"
        return f"[{repo_id}](https://huggingface.co/{repo_id}){at}"
    return f"local folder `{PurePath(entry['ref'].rstrip('/')).name or entry['ref']}`"


def _corpus(corpus: Any) -> str:
    """A corpus as the card shows it: Hub dataset ids and plain names as given, local paths by their last parts."""
    text = str(corpus)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        return "/".join(PurePath(text).parts[-2:])
    return text


def _kind(adapter: dict[str, Any]) -> str | None:
    if adapter.get("kind"):
        return _KINDS.get(str(adapter["kind"]).lower(), str(adapter["kind"]))
    if adapter.get("dora") is not None:
        return "DoRA" if adapter["dora"] else "LoRA"
    return None


def _number(value: float) -> str:
    return f"{value:g}"


def _intro(info: dict, retriever: dict, base: dict, adapters: list, beta: Any) -> str:
    title = info.get("model_name") or f"{PurePath(retriever['ref'].split('@')[0].rstrip('/')).name} (readapted)"
    lines = [
        f"# {title}",
        "",
        f"A dense retriever made from {_name(retriever)} by RE-AdaptIR (Fleshman & Van Durme): the retriever's "
        "fine-tuning, Delta = retriever - base, is kept, and a knowledge adapter Psi trained on unlabeled text "
        "with next-token prediction on the base LM is added: `merged = base + alpha * Psi + beta * Delta`.",
    ]
    if base.get("ref"):
        lines[-1] += f" The base LM is {_name(base)}."
    corpora = [_corpus(c) for a in adapters if a.get("corpus") for c in str(a["corpus"]).split(", ")]
    if corpora:
        lines.append("")
        lines.append(f"Adapted to: {', '.join(f'`{c}`' for c in corpora)}.")
    version = info.get("reforge_version")
    lines += ["", f"Made with reforge{f' {version}' if version else ''}."]
    return "\n".join(lines)


def _provenance(retriever: dict, base: dict, delta: dict, adapters: list) -> str:
    rows = [("base", base), ("retriever", retriever), ("delta", delta)]
    rows += [(f"adapter {i + 1}" if len(adapters) > 1 else "adapter", a) for i, a in enumerate(adapters)]
    rows = [(role, e) for role, e in rows if e.get("ref")]
    with_print = any(e.get("fingerprint") for _, e in rows)
    header = "| role | checkpoint |" + (" fingerprint |" if with_print else "")
    lines = ["## Provenance", "", header, "|---|---|" + ("---|" if with_print else "")]
    for role, entry in rows:
        cell = f" `{entry['fingerprint']}` |" if entry.get("fingerprint") else (" |" if with_print else "")
        lines.append(f"| {role} | {_name(entry)} |{cell}")
    return "\n".join(lines)


def _recipe(adapters: list, beta: Any, info: dict) -> str:
    lines = ["## How it was made"]
    terms = ["base"] + [
        f"{_number(a['alpha'])} * Psi{i + 1 if len(adapters) > 1 else ''}"
        for i, a in enumerate(adapters)
        if a.get("alpha") is not None
    ]
    if beta is not None:
        terms.append(f"{_number(beta)} * Delta")
    if len(terms) > 1:
        lines += [
            "",
            f"`merged = {' + '.join(terms)}`, computed in float32 tensor by tensor"
            + (f" and stored as {info['dtype']}." if info.get("dtype") else "."),
        ]
    details = []
    for i, a in enumerate(adapters):
        facts = [
            f"alpha {_number(a['alpha'])}" if a.get("alpha") is not None else None,
            _kind(a),
            a.get("rank") and f"rank {a['rank']}",
            a.get("steps") and f"{a['steps']} steps",
            a.get("corpus") and "trained on " + ", ".join(f"`{_corpus(c)}`" for c in str(a["corpus"]).split(", ")),
        ]
        label = f"Psi{i + 1}" if len(adapters) > 1 else "Psi"
        details.append(f"- {label}: {_name(a)}" + (f" ({', '.join(f for f in facts if f)})" if any(facts) else ""))
    if details:
        lines += [""] + details
    rounding = (info.get("delta") or {}).get("max_abs_rounding")
    if rounding is not None:
        lines += ["", f"Delta was read from a stored delta checkpoint (largest rounding error {rounding:.3g})."]
    if info.get("command"):
        lines += ["", "The exact command:", "", "```bash", str(info["command"]), "```"]
    return "\n".join(lines) if len(lines) > 1 else ""


def _evaluation(rows: list) -> str:
    rows = [r for r in rows if r.get("dataset") and r.get("metric") and r.get("value") is not None]
    if not rows:
        return ""
    with_base = any(r.get("retriever_value") is not None for r in rows)
    lines = [
        "## Evaluation",
        "",
        "| dataset | metric | this model |" + (" retriever |" if with_base else ""),
        "|---|---|---|" + ("---|" if with_base else ""),
    ]
    for r in rows:
        extra = ""
        if with_base:
            extra = f" {r['retriever_value']:.4f} |" if r.get("retriever_value") is not None else " |"
        lines.append(f"| {r['dataset']} | {r['metric']} | {r['value']:.4f} |{extra}")
    return "\n".join(lines)


def _usage(info: dict, library: str) -> str:
    repo = info.get("repo_id") or "path/to/this-model"
    enc = info.get("encoding") or {}
    q, p = enc.get("query_prefix", ""), enc.get("passage_prefix", "")
    prompt_names = info.get("prompt_names") or []
    if library == "sentence-transformers" and {"query", "document"} <= set(prompt_names):
        # the folder's own prompts, pooling, max length and EOS: encodes exactly as `reforge eval` does
        code = [
            "from sentence_transformers import SentenceTransformer",
            "",
            f'model = SentenceTransformer("{repo}")',
            'queries = model.encode(["how do vaccines work?"], prompt_name="query")',
            'passages = model.encode(["Vaccines train the immune system."], prompt_name="document")',
            "scores = model.similarity(queries, passages)",
        ]
        tasks = sorted(set(prompt_names) - {"query", "document"})
        if tasks:
            code.append(f'# per-task instructions: prompt_name="{tasks[0]}" (also: {", ".join(tasks[1:])})')
    elif library == "sentence-transformers":
        code = [
            "from sentence_transformers import SentenceTransformer",
            "",
            f'model = SentenceTransformer("{repo}")',
            f'queries = model.encode(["how do vaccines work?"]{", prompt=" + repr(q) if q else ""})',
            f'passages = model.encode(["Vaccines train the immune system."]{", prompt=" + repr(p) if p else ""})',
            "scores = model.similarity(queries, passages)",
        ]
    else:
        pooling = enc.get("pooling", "last")
        pool = {"mean": "(h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)", "cls": "h[:, 0]"}.get(
            pooling, "h[torch.arange(len(h)), mask.sum(1) - 1]  # last token (right padding)"
        )
        length = int(enc.get("max_length") or 512)
        norm = ["e = torch.nn.functional.normalize(e, dim=-1)"] if enc.get("normalize", True) else []
        code = (
            [
                "import torch",
                "from transformers import AutoModel, AutoTokenizer",
                "",
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                f'model = AutoModel.from_pretrained("{repo}", torch_dtype="auto").eval()',
                "",
                "def embed(texts):",
                *_tokenize_lines(length, bool(enc.get("append_eos"))),
                "    with torch.no_grad():",
                "        h = model(**batch).last_hidden_state",
                '    mask = batch["attention_mask"]',
                f"    e = {pool}",
            ]
            + [f"    {line}" for line in norm]
            + [
                "    return e",
                "",
                f"queries = embed([{repr(q + 'how do vaccines work?')}])",
                f"passages = embed([{repr(p + 'Vaccines train the immune system.')}])",
                "scores = queries @ passages.T",
            ]
        )
    return "\n".join(["## Usage", "", "```python", *code, "```"])


def _tokenize_lines(length: int, append_eos: bool) -> list[str]:
    """The snippet's tokenization: cut at the profile's max length, the EOS (if any) appended after the cut."""
    if not append_eos:
        return [
            f"    batch = tokenizer(texts, padding=True, truncation=True, max_length={length}, "
            'padding_side="right", return_tensors="pt")'
        ]
    return [
        f'    ids = tokenizer(texts, truncation=True, max_length={length - 1})["input_ids"]',
        '    batch = tokenizer.pad({"input_ids": [i + [tokenizer.eos_token_id] for i in ids]}, '
        'padding_side="right", return_tensors="pt")',
    ]


def _encoding(enc: dict) -> str:
    facts = []
    if "query_prefix" in enc:
        facts.append(f"- queries are prefixed with `{enc['query_prefix']!r}`")
    if "passage_prefix" in enc:
        facts.append(f"- passages are prefixed with `{enc['passage_prefix']!r}`")
    if enc.get("pooling"):
        facts.append(f"- pooling: {_POOLING_TEXT.get(enc['pooling'], enc['pooling'])}")
    if enc.get("append_eos"):
        facts.append("- an EOS token is appended to every text")
    if "normalize" in enc:
        facts.append(
            "- embeddings are L2-normalized; score with the dot product (cosine)"
            if enc["normalize"]
            else "- embeddings are not normalized; score with the dot product"
        )
    if enc.get("max_length"):
        facts.append(f"- texts are truncated to {enc['max_length']} tokens")
    if not facts:
        return ""
    return "\n".join(["## Encoding convention", "", "Encode exactly like the original retriever:", "", *facts])


# ---- measured results: `reforge eval --card FOLDER` ---------------------------------------------------------------

REPRODUCE_HEADING = "## Reproduce"  # added by `write_card_recipe` to the card of a folder made by `reforge run`
EVAL_RECORD = "reforge_eval.json"  # beside README.md: the numbers the card shows, with what they were measured on
_METRIC_IDS = {"nDCG": "ndcg", "R": "recall", "P": "precision", "RR": "mrr", "AP": "map", "Success": "hit_rate"}


def evaluation_record(summary: dict[str, Any], model: str, retriever: str) -> dict[str, Any]:
    """The part of a ``reforge eval`` summary (``EvalReport.to_dict()``) a card may show: ``model``'s and
    ``retriever``'s scores on each dataset, ``model``'s paired test against ``retriever``, and what they were
    measured on (dataset content hashes, split, settings, both fingerprints).

    Raises:
        InvalidOptionError: either model is not in the summary, ``model`` was not tested against ``retriever``,
            or a dataset was a sample (a card shows whole-split scores only).
    """
    models = {m["name"]: m for m in summary.get("models", [])}
    for name in (model, retriever):
        if name not in models:
            raise InvalidOptionError(f"{name!r} is not a model of this evaluation (it has: {', '.join(models)}).")
    results = {(r["model"], r["dataset"]): r for r in summary.get("results", [])}
    tests = {(c["model"], c["baseline"], c["dataset"], c["measure"]): c for c in summary.get("comparisons", [])}
    datasets = {}
    for d in summary.get("datasets", []):
        if d.get("sample"):
            raise InvalidOptionError(
                f"{d['name']} was evaluated on a sample; a card shows whole-split scores only.",
                hint="Rerun without --max-queries / --corpus-sample to update the card.",
                option="--card",
            )
        scores = {}
        for measure in summary["measures"]:
            test = tests.get((model, retriever, d["name"], measure))
            if test is None:
                raise InvalidOptionError(f"{model!r} was not compared with {retriever!r} on {d['name']}.")
            scores[measure] = {
                "model": results[(model, d["name"])]["scores"][measure],
                "retriever": results[(retriever, d["name"])]["scores"][measure],
                **{k: test[k] for k in ("delta", "n", "p_ttest", "p_randomization", "wins", "ties", "losses")},
            }
        keys = ("split", "documents", "queries", "judgments", "content_hash")
        datasets[d["name"]] = {**{k: d.get(k) for k in keys}, "scores": scores}
    settings = summary.get("settings", {})
    return {
        "reforge_version": summary.get("reforge_version"),
        "model": {k: models[model].get(k) for k in ("name", "fingerprint")},
        "retriever": {k: models[retriever].get(k) for k in ("name", "ref", "fingerprint")},
        "averaging": summary.get("averaging"),
        "settings": {k: settings.get(k) for k in ("top_k", "keep_identical_ids", "permutations", "seed")},
        "datasets": datasets,
    }


def merge_evaluation(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the datasets of ``old`` it does not measure again, when both measured the same weights (same
    fingerprints of model and retriever) the same way (averaging and settings); otherwise ``new`` alone."""
    same = old and all(old.get(k) == new.get(k) for k in ("model", "retriever", "averaging", "settings"))
    if not same:
        return new
    return {**new, "datasets": {**old.get("datasets", {}), **new["datasets"]}}


def card_with_evaluation(card: str | None, record: dict[str, Any], *, model_name: str | None = None) -> str:
    """``card`` (README.md text; None: a minimal card) with its ``model-index`` and its Evaluation section set from
    ``record`` (`evaluation_record`), through huggingface_hub's ``ModelCard`` and ``EvalResult``.

    The model-index holds, per dataset and measure, the model's value and the retriever's (named as such), with
    the dataset's split and content hash, and ``reforge_eval.json`` as the source. The Evaluation section's table
    puts retriever and readapted side by side with the difference and the paired tests. Everything else in the
    card is kept.
    """
    from huggingface_hub import ModelCard, ModelCardData

    parsed = ModelCard(card) if card and card.startswith("---") else ModelCard(f"---\n---\n\n{card or ''}")
    data = parsed.data or ModelCardData()
    name = model_name or data.model_name or record["model"]["name"]
    data.model_name = name
    data.eval_results = _eval_results(record)
    body = _replace_section(parsed.text, "## Evaluation", _evaluation_section(record))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"))


def write_card_evaluation(folder: str | Path, record: dict[str, Any]) -> tuple[Path, Path]:
    """Merge ``record`` into ``folder/reforge_eval.json`` (`merge_evaluation`) and rewrite ``folder/README.md``
    with it (`card_with_evaluation`); both written atomically. Returns the two paths."""
    import json

    from reforge.io.atomic import write_atomic

    folder = Path(folder)
    record_path, card_path = folder / EVAL_RECORD, folder / "README.md"
    old = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else None
    merged = merge_evaluation(old, record)
    card = card_with_evaluation(card_path.read_text(encoding="utf-8") if card_path.is_file() else None, merged)
    text = json.dumps(merged, indent=2, sort_keys=True) + "\n"
    write_atomic(record_path, lambda f: f.write(text.encode("utf-8")))
    write_atomic(card_path, lambda f: f.write(card.encode("utf-8")))
    return card_path, record_path


def card_with_recipe(card: str, recipe_file: str) -> str:
    """``card`` (README.md text) with a Reproduce section: the folder holds ``recipe_file``, the copy of the recipe
    that made it, and ``reforge run`` on it makes the folder again. An existing Reproduce section is replaced; the
    rest of the card is kept.

    Example:
        >>> print(card_with_recipe("# m\\n", "reforge-recipe.yaml").split("## Reproduce")[1].splitlines()[-2])
        reforge run reforge-recipe.yaml
    """
    section = "\n".join(
        [
            REPRODUCE_HEADING,
            "",
            f"This folder holds the recipe that made it, `{recipe_file}`. With its paths pointing at the same inputs "
            "(local folders and files, or Hub ids), this runs it again; a job whose output already holds the same "
            "fingerprint is skipped:",
            "",
            "```bash",
            f"reforge run {recipe_file}",
            "```",
        ]
    )
    return _replace_section(card, REPRODUCE_HEADING, section, before=None) + "\n"


def write_card_recipe(folder: str | Path, recipe_file: str) -> Path | None:
    """Add the Reproduce section (`card_with_recipe`) to ``folder/README.md`` when ``folder`` holds
    ``recipe_file``; written atomically and only when it changes. Returns the card's path, or None when the folder
    has no card or no recipe copy."""
    from reforge.io.atomic import write_atomic

    folder = Path(folder)
    card_path = folder / "README.md"
    if not (card_path.is_file() and (folder / recipe_file).is_file()):
        return None
    old = card_path.read_text(encoding="utf-8")
    card = card_with_recipe(old, recipe_file)
    if card != old:
        write_atomic(card_path, lambda f: f.write(card.encode("utf-8")))
    return card_path


def metric_id(measure: str) -> str:
    """An ir-measures name as a model-index metric type: ``nDCG@10`` -> ``ndcg_at_10``, ``AP`` -> ``map``."""
    head, _, cutoff = measure.partition("@")
    base = _METRIC_IDS.get(head, head.lower())
    return f"{base}_at_{cutoff}" if cutoff else base


def _eval_results(record: dict[str, Any]) -> list[Any]:
    from huggingface_hub import EvalResult

    retriever = record["retriever"]["name"]
    results = []
    for name, d in record["datasets"].items():
        common = {
            "task_type": "retrieval",
            "task_name": "Retrieval",
            "dataset_type": name,
            "dataset_name": f"{name} (BEIR folder, {d['queries']} queries, {d['documents']} documents)",
            "dataset_split": d["split"],
            "dataset_revision": f"reforge-sha256:{str(d['content_hash'])[:16]}",
            "source_name": f"reforge eval {record.get('reforge_version') or ''}".strip(),
            "source_url": EVAL_RECORD,
        }
        for measure, s in d["scores"].items():
            kind = metric_id(measure)
            results.append(
                EvalResult(**common, metric_type=kind, metric_value=round(s["model"], 4), metric_name=measure)
            )
            results.append(
                EvalResult(
                    **common,
                    metric_type=kind,
                    metric_value=round(s["retriever"], 4),
                    metric_name=f"{measure} of the original retriever ({retriever})",
                )
            )
    return results


def _evaluation_section(record: dict[str, Any]) -> str:
    retriever, model = record["retriever"]["name"], record["model"]["name"]
    settings = record.get("settings") or {}
    averaging = record.get("averaging")
    averaging = averaging.get("meaning") or averaging.get("name") if isinstance(averaging, dict) else averaging
    lines = [
        "## Evaluation",
        "",
        f"Measured with `reforge eval` {record.get('reforge_version') or ''} on the folders named below "
        f"(`{EVAL_RECORD}` holds every number with the content hash of what it was measured on). Δ = readapted "
        f"minus retriever; p from a paired t-test and a paired randomization test "
        f"({settings.get('permutations')} sign flips, seed {settings.get('seed')}); W/T/L = queries better/equal/"
        f"worse; top-{settings.get('top_k')}, identical query/document ids "
        f"{'kept' if settings.get('keep_identical_ids') else 'dropped'}, averaging: {averaging}.",
        "",
        f"| dataset | split | metric | retriever ({retriever}) | readapted ({model}) | Δ | p (t-test) | p (rand.) "
        "| W/T/L |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in record["datasets"].items():
        for measure, s in d["scores"].items():
            lines.append(
                f"| {name} | {d['split']} | {measure} | {s['retriever']:.4f} | {s['model']:.4f} | {s['delta']:+.4f} "
                f"| {_p(s['p_ttest'])} | {_p(s['p_randomization'])} | {s['wins']}/{s['ties']}/{s['losses']} |"
            )
    return "\n".join(lines)


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}"


def _replace_section(text: str, heading: str, section: str, before: str | None = "## Usage") -> str:
    """``text`` with the Markdown section under ``heading`` (up to the next ``## ``) replaced by ``section``; added
    before ``before`` (else at the end) when there is none."""
    lines = text.strip().split("\n")
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        return "\n".join([*lines[:start], *section.split("\n"), "", *lines[end:]]).strip()
    if before is not None and before in lines:
        at = lines.index(before)
        return "\n".join([*lines[:at], *section.split("\n"), "", *lines[at:]]).strip()
    return f"{text.strip()}\n\n{section}".strip()
