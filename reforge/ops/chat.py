"""RE-Adapt of an instruction-tuned chat model: Delta = instruct - base *keeping* ``lm_head``, merged and written
as a CausalLM. Chosen explicitly (``keep_lm_head``); without it, a CausalLM with an ``lm_head`` given as the
retriever is refused, because a retriever has no head and dropping it would leave a chat model with a random one.
"""

from __future__ import annotations

from dataclasses import replace

from reforge.errors import UnsupportedModelError
from reforge.io.checkpoint import AdapterCheckpoint, Checkpoint

OPTION = "--keep-lm-head"


def apply_head_rule(base: Checkpoint, retriever: Checkpoint | AdapterCheckpoint, keep_lm_head: bool) -> None:
    """Check ``retriever`` against the head rule and, with ``keep_lm_head``, make both layouts keep their head.

    Raises:
        UnsupportedModelError: a causal LM with an ``lm_head`` without ``keep_lm_head``; or ``keep_lm_head`` with a
            peft adapter or a model that is not a causal LM.
    """
    if isinstance(retriever, AdapterCheckpoint):
        if keep_lm_head:
            raise UnsupportedModelError(
                f"{OPTION} needs the full instruction-tuned model; {retriever.ref} is a peft adapter.",
                hint="Merge the adapter into its base first, or leave out --keep-lm-head for a LoRA retriever.",
                path=retriever.path,
                reason="adapter with keep_lm_head",
            )
        return
    if keep_lm_head:
        if not is_causal_lm(retriever):
            raise UnsupportedModelError(
                f"{OPTION} is for instruction-tuned causal LMs (RE-Adapt); {retriever.ref} is "
                f"{retriever.architecture or 'not a causal LM'}.",
                hint=f"Leave out {OPTION} for a retriever.",
                path=retriever.path,
                reason="not a causal LM",
            )
        base.layout = replace(base.layout, keep_head=True)
        retriever.layout = replace(retriever.layout, keep_head=True)
        return
    same = retriever.provenance.get("fingerprint") == base.provenance.get("fingerprint")
    # the base against itself (diff(x, x)) is no chat model; a bare "base" means the two were swapped, which
    # `diff` warns about (`swapped_roles`)
    if has_lm_head(retriever) and not same and not base.layout.is_bare:
        raise UnsupportedModelError(
            f"{retriever.ref} is a causal LM with an lm_head ({retriever.architecture or 'lm_head.weight'}), e.g. an "
            f"instruction-tuned chat model, not a retriever: writing it as a retriever would drop its head.",
            hint=f"To readapt a chat model (RE-Adapt: Delta = instruct - base keeping lm_head, output a CausalLM), "
            f"pass {OPTION} to diff and merge.",
            path=retriever.path,
            reason="causal LM as retriever",
        )


def has_lm_head(checkpoint: Checkpoint) -> bool:
    """True when the checkpoint stores an ``lm_head`` tensor and is not a masked LM (XLM-R's MLM head is also
    named lm_head)."""
    heads = {key.split(".", 1)[0] for key in checkpoint.layout.head}
    masked = any("MaskedLM" in a for a in (checkpoint.config or {}).get("architectures") or [])
    return "lm_head" in heads and not masked


def is_causal_lm(checkpoint: Checkpoint) -> bool:
    """A causal LM by its config (``...ForCausalLM``), or by its tensors when it has no config."""
    architectures = (checkpoint.config or {}).get("architectures") or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return has_lm_head(checkpoint)
