"""Key layouts: the same weights saved under different names, mapped to one canonical form.

A ``LlamaForCausalLM`` saves ``model.layers.0.mlp.up_proj.weight`` and ``lm_head.weight``; the bare ``LlamaModel``
a retriever is saves ``layers.0.mlp.up_proj.weight`` and no head; a peft adapter prefixes either with
``base_model.model.``. The canonical key is the bare-model name. Head tensors (``lm_head``, BERT's ``cls``, ...)
have no canonical key: retrievers have none, so diff and merge drop them. Embeddings are never head tensors, so
tied checkpoints (no ``lm_head`` at all) keep ``embed_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from reforge.errors import LayoutMismatchError

PEFT_PREFIX = "base_model.model."
HEAD_MODULES = frozenset({"lm_head", "cls", "score", "classifier", "qa_outputs", "output_layer"})
# canonical names of tensors with one row per vocabulary entry (token/position embeddings, and a kept lm_head):
# the only tensors that may have more rows than the base's
EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "lm_head")
# head modules with generic names, recognized only for their model_type (ModernBertForMaskedLM: head.*, decoder.*)
MODEL_TYPE_HEADS = {"modernbert": frozenset({"head", "decoder"})}
# first components that wrap the body of a head model (transformers' base_model_prefix values)
KNOWN_BODY_PREFIXES = frozenset(
    {
        "model",
        "bert",
        "roberta",
        "xlm_roberta",
        "transformer",
        "deberta",
        "electra",
        "distilbert",
        "albert",
        "gpt_neox",
        "encoder_model",
        "language_model",
    }
)


@dataclass(frozen=True)
class KeyLayout:
    """How one checkpoint names its tensors.

    Attributes:
        prefix: stripped to get the canonical key, e.g. ``"model."``, ``""``, ``"base_model.model.model."``.
        head: the stored keys that belong to a head (``lm_head.weight``), which have no canonical key.
    """

    prefix: str
    head: frozenset[str] = frozenset()
    keep_head: bool = False

    def canonical(self, key: str) -> str | None:
        """The bare-model name of a stored key, or None for a head tensor or a key outside the layout. With
        ``keep_head`` (RE-Adapt of a chat model) a head tensor is its own canonical name (``lm_head.weight``)."""
        if key in self.head:
            return key if self.keep_head else None
        if not key.startswith(self.prefix):
            return None
        return key[len(self.prefix) :]

    def stored(self, canonical: str) -> str:
        """The name this checkpoint stores a canonical key under."""
        if self.keep_head and canonical in self.head_names():
            return canonical
        return self.prefix + canonical

    def head_names(self) -> frozenset[str]:
        """The canonical names head tensors get with ``keep_head`` (``lm_head.weight``)."""
        return self.head | frozenset(f"{module}.weight" for module in HEAD_MODULES)

    @property
    def is_bare(self) -> bool:
        """True for a bare-model layout (what retrievers are): no body prefix and no head."""
        return self.prefix in ("", PEFT_PREFIX) and not self.head


def detect_layout(keys: Iterable[str], config: dict | None = None) -> KeyLayout:
    """Work out a checkpoint's layout from its tensor names (and ``config.json``, when there is one).

    The body prefix is stripped only when every non-head key shares it and it is a known wrapper name
    (``model``, ``bert``, ...), the config's ``model_type``, or there are head tensors beside it.
    """
    keys = list(keys)
    peft = PEFT_PREFIX if keys and all(k.startswith(PEFT_PREFIX) for k in keys) else ""
    inner = [k[len(peft) :] for k in keys]
    heads = HEAD_MODULES | MODEL_TYPE_HEADS.get(str((config or {}).get("model_type")), frozenset())
    head = {k for k in inner if k.split(".", 1)[0] in heads}
    body = [k for k in inner if k not in head]
    firsts = {k.split(".", 1)[0] for k in body if "." in k}
    prefix = ""
    if len(firsts) == 1 and all("." in k for k in body):
        (first,) = firsts
        model_type = (config or {}).get("model_type")
        if first in KNOWN_BODY_PREFIXES or first == model_type or head:
            prefix = first + "."
    return KeyLayout(peft + prefix, frozenset(peft + k for k in head))


def canonical_map(keys: Iterable[str], layout: KeyLayout) -> dict[str, str]:
    """``{canonical key: stored key}`` for every non-head key."""
    mapping = {}
    for key in keys:
        canonical = layout.canonical(key)
        if canonical is not None:
            mapping[canonical] = key
    return mapping


def match_keys(
    left: dict[str, str], right: dict[str, str], *, left_name: str, right_name: str, hint: str | None = None
) -> None:
    """Check that two ``{canonical: stored}`` maps hold the same tensors, or raise one clear error."""
    missing_left = sorted(set(right) - set(left))
    missing_right = sorted(set(left) - set(right))
    if not missing_left and not missing_right:
        return
    parts = []
    if missing_left:
        parts.append(
            f"{len(missing_left)} tensor(s) of {right_name} are not in {left_name} (e.g. {right[missing_left[0]]!r})"
        )
    if missing_right:
        parts.append(
            f"{len(missing_right)} tensor(s) of {left_name} are not in {right_name} (e.g. {left[missing_right[0]]!r})"
        )
    raise LayoutMismatchError(
        "; ".join(parts) + ".",
        hint=hint
        or "Are both checkpoints the same architecture? (Layouts are matched after removing 'model.', "
        "'base_model.model.' and head tensors such as lm_head.)",
        left=left_name,
        right=right_name,
        tensor=(missing_left or missing_right)[0],
        details={"only_in_left": missing_right[:20], "only_in_right": missing_left[:20]},
    )


def is_embedding(key: str) -> bool:
    """True for a token or position embedding (by canonical name)."""
    return any(hint in key for hint in EMBEDDING_HINTS)


def extra_rows(key: str, base_shape: tuple[int, ...], shape: tuple[int, ...]) -> int | None:
    """The vocabulary rule, shared by diff, merge and verify: how many rows ``key`` has beyond the base's.

    0 when the shapes are equal; the count of added rows for an embedding whose vocabulary grew (same width,
    more rows: tokens added to the retriever); None when the shapes do not line up, which is an error.
    """
    if tuple(base_shape) == tuple(shape):
        return 0
    grown = len(shape) == 2 and len(base_shape) == 2 and base_shape[1] == shape[1] and shape[0] > base_shape[0]
    return shape[0] - base_shape[0] if grown and is_embedding(key) else None
