"""Attention for a training step's documents: each document attends causally to itself only, exactly as the
model's own attention would attend over that document alone.

A packed row holds several documents whose position ids restart at 0 (`reforge.train.batching.collate`). Four
paths give every token the attention it would get in its document alone (``--attention``, `ATTENTIONS`):

- ``split`` (the default on every device, see `plan_attention`): each document is cut out of the packed row and
  attended alone by ``scaled_dot_product_attention(is_causal=True)``, the pattern of flash-attention's varlen
  kernels. A sliding window shorter than the document becomes a banded mask; a softcap, which sdpa cannot apply,
  is computed the way the model's eager attention computes it (scores, tanh cap, mask, float32 softmax) on that
  document. Forward and backward are checked on CPU against each family's eager attention.
- ``padded``: no packing; the step's documents go through the model as one right-padded batch with an attention
  mask, through the model's own attention (sdpa, or eager where the family needs it): what HF Trainer does. Any
  causal family; forward and backward checked on CPU. Costs the padding (about 30% of positions for SciFact
  batches of 4).
- ``flex`` (CUDA only, opt-in): PyTorch's ``flex_attention``, compiled, with a document ``BlockMask``.
  transformers builds the mask once per forward pass and per kind of layer (full or sliding window) through the
  mask function registered here, from its own mask functions (causal, sliding window, packed documents), and
  hands the same mask to every layer of that kind. Blocks outside every document are skipped. Gemma2's
  attention-logit softcap is a ``score_mod``. ``flex_attention`` has no backward on CPU (NotImplementedError), so
  its gradients are checked only by the device check (``make gpu-check``); it becomes the CUDA default only in the
  commit that records that evidence.
- ``fallback``: a family not in `PACKED_FAMILIES`, or an attention feature neither packed path implements
  (bidirectional attention), under ``auto`` keeps the model's own attention (sdpa or eager) over packed rows;
  transformers then builds a block-diagonal mask from the position ids: exact, but a full row x row mask per
  layer. `plan_attention` says why, and the training record carries that note so the CLI warns once.

Both packed paths refuse, at the call, any attention argument they do not implement, so a new transformers feature
fails loudly instead of changing the attention silently. tests/test_attention.py compares logits and gradients with
each family's eager attention per document.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reforge.errors import InvalidOptionError
from reforge.train.config import ATTENTIONS

PACKED_SPLIT = "reforge_packed_split"
PACKED_FLEX = "reforge_packed_flex"
# model_type values whose attention both packed paths reproduce exactly (tests/test_attention.py, one test each)
PACKED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
# attention kwargs that carry no attention feature (bookkeeping transformers passes down to every layer)
_INERT_KWARGS = frozenset(
    {"position_ids", "use_cache", "cache_position", "output_attentions", "return_dict", "output_hidden_states"}
)


@dataclass(frozen=True)
class AttentionPlan:
    """How a model attends within the documents of a training step.

    Fields: ``path`` (``"split"``, ``"padded"``, ``"flex"`` or ``"fallback"``), ``implementation`` (the
    ``attn_implementation`` to load the model with; None keeps transformers' default) and ``note`` (for a fallback:
    why, in one sentence for the user; None otherwise).
    """

    path: str
    implementation: str | None
    note: str | None = None

    @property
    def packed(self) -> bool:
        """Whether the step's documents are packed into rows (every path but ``padded``)."""
        return self.path != "padded"

    def to_dict(self) -> dict[str, Any]:
        """The plan as the training record stores it."""
        return {"path": self.path, "implementation": self.implementation, "note": self.note}


def plan_attention(model_config, device_type: str, requested: str = "auto") -> AttentionPlan:
    """Choose the attention path for a model (a transformers config) trained on ``device_type``.

    ``requested`` is ``--attention``: ``auto`` gives ``split`` on every device (the path whose forward and
    backward the CPU suite checks; flex's gradients have not yet been compared on a GPU), or ``fallback`` with a
    note for a family or feature the packed paths do not reproduce. ``split``, ``padded`` and ``flex`` are taken
    as asked, after checking the family and device can run them.

    Raises:
        InvalidOptionError: ``split``/``flex`` for a family they do not reproduce, ``flex`` off CUDA, with
            attention dropout, or on a PyTorch without flex_attention.
    """
    if requested not in ATTENTIONS:
        _refuse(f"must be one of {', '.join(ATTENTIONS)}, got {requested!r}")
    model_type = getattr(model_config, "model_type", None)
    if requested == "padded":
        return AttentionPlan("padded", None)
    reason = None
    if model_type not in PACKED_FAMILIES:
        reason = f"packed attention is implemented for {', '.join(PACKED_FAMILIES)}, not {model_type}"
    elif getattr(model_config, "use_bidirectional_attention", False) or not getattr(model_config, "is_causal", True):
        reason = f"this {model_type} config uses bidirectional attention"
    if reason and requested != "auto":
        _refuse(f"{requested}: {reason}; pass --attention padded or auto")
    if reason:
        return AttentionPlan(
            "fallback",
            None,
            f"{reason}: training uses the model's own attention with a row x row block-diagonal mask (exact, slower).",
        )
    register_packed_attention()
    if requested == "flex":
        if device_type != "cuda":
            _refuse(f"flex needs CUDA: flex_attention has no backward on {device_type}; pass --attention split")
        if getattr(model_config, "attention_dropout", 0.0):
            _refuse("flex: flex_attention has no attention dropout, which this config sets; pass --attention split")
        if not _has_flex():
            _refuse("flex: this PyTorch has no flex_attention (2.5 or later); pass --attention split")
        return AttentionPlan("flex", PACKED_FLEX)
    return AttentionPlan("split", PACKED_SPLIT)


def _refuse(problem: str) -> None:
    raise InvalidOptionError(f"Training option attention {problem}.", option="attention")


def _has_flex() -> bool:
    """PyTorch 2.5 or later (flex_attention with GQA)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def register_packed_attention(path: str = "split") -> str:
    """Make both packed paths known to transformers (idempotent); return the ``attn_implementation`` name of
    ``path`` (``"split"`` or ``"flex"``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SPLIT, split_attention)
    AttentionMaskInterface.register(PACKED_SPLIT, _no_padding_mask)
    AttentionInterface.register(PACKED_FLEX, flex_attention)
    AttentionMaskInterface.register(PACKED_FLEX, flex_block_mask)
    return {"split": PACKED_SPLIT, "flex": PACKED_FLEX}[path]


# ---- split: one call per document ---------------------------------------------------------------------------------


def split_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    """transformers' attention signature: ``query`` (batch, heads, L, dim), ``key``/``value`` (batch, kv heads,
    L, dim); returns ``(output (batch, L, heads, dim), None)``. A document starts wherever a position id is not
    the previous one plus 1."""
    import torch

    _refuse_unknown(module, query, key, kwargs)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise RuntimeError("packed attention reads document boundaries from position_ids; none were given")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    batch, heads, length, dim = query.shape
    positions = position_ids.expand(batch, length)
    starts = positions[:, 1:] != positions[:, :-1] + 1
    scale = dim**-0.5 if scaling is None else scaling

    def attend(q, k, v):
        return _attend_document(
            q, k, v, scale=scale, window=sliding_window, softcap=softcap, dropout=dropout if module.training else 0.0
        )

    if not bool(starts.any()):
        return attend(query, key, value).transpose(1, 2).contiguous(), None
    # The rows side by side as one sequence per head, cut into documents by one `split`, whose backward is one
    # `cat` (slicing each document out instead would zero-fill a full-size gradient per document).
    cuts = [b * length + c for b in range(batch) for c in (0, *(starts[b].nonzero().flatten() + 1).tolist())]
    sizes = [end - begin for begin, end in zip(cuts, [*cuts[1:], batch * length])]
    pieces = [t.transpose(0, 1).reshape(1, heads, batch * length, dim).split(sizes, dim=2) for t in (query, key, value)]
    out = torch.cat([attend(q, k, v) for q, k, v in zip(*pieces)], dim=2)
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None


def _attend_document(q, k, v, *, scale: float, window: int | None, softcap: float | None, dropout: float):
    """Causal attention over one document (``(1, heads, n, dim)`` each), with the window and softcap of eager."""
    import torch
    import torch.nn.functional as F

    n = q.shape[2]
    banded = window is not None and n > window
    if softcap is None and not banded:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
    allowed = document_mask(n, window, q.device)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale)
    # As transformers' eager attention computes it: cap the scaled scores, mask, softmax in float32.
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, v)


def document_mask(n: int, window: int | None, device=None):
    """``(n, n)`` booleans: token i sees token j when ``j <= i`` and, with a window, ``i - j < window`` (the
    sliding window of transformers' masks: the token itself and the ``window - 1`` before it)."""
    import torch

    i = torch.arange(n, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window) if window is not None else distance >= 0


def _no_padding_mask(batch_size: int, q_length: int, kv_length: int, attention_mask=None, **kwargs):
    """The split path's mask function: it needs no mask, and refuses a padding mask it would otherwise drop."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "packed attention takes no padding mask: pad with a document of its own (as "
            "reforge.train.batching.collate does) and pass position_ids"
        )
    return None


# ---- flex: one masked kernel per layer ----------------------------------------------------------------------------


def flex_block_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask=None,
    device="cpu",
    **kwargs,
):
    """transformers' mask-function signature: the ``BlockMask`` of ``mask_function`` (causal, sliding window and
    packed documents, as composed by transformers for this kind of layer). Called once per forward pass and kind of
    layer; compiled on CUDA, built eagerly elsewhere (the CPU tests)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.masking_utils import (
        add_offsets_to_mask_function,
        and_masks,
        causal_mask_function,
        padding_mask_function,
        prepare_padding_mask,
    )

    mask_function = mask_function or causal_mask_function
    if attention_mask is not None and not bool(attention_mask.all()):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    mask_function = add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
    return create_block_mask(
        mask_function,
        batch_size,
        None,
        q_length,
        kv_length,
        device=device,
        _compile=torch.device(device).type == "cuda",
    )


def flex_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    """transformers' attention signature over ``attention_mask``, the layer's ``BlockMask`` from `flex_block_mask`
    (which already holds the sliding window). Compiled on CUDA; eager elsewhere, where it has no backward."""
    from torch.nn.attention.flex_attention import BlockMask
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    _refuse_unknown(module, query, key, kwargs)
    if not isinstance(attention_mask, BlockMask):
        raise RuntimeError(
            f"flex packed attention needs the BlockMask of its mask function, got {type(attention_mask).__name__}"
        )
    if dropout and module.training:
        raise RuntimeError("flex_attention has no dropout: plan_attention refuses flex for such models")
    heads, kv_heads = query.shape[1], key.shape[1]
    gqa = heads != kv_heads
    if gqa and heads & (heads - 1):  # like transformers: expand the heads when the count is not a power of two
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
        gqa = False
    score_mod = None
    if softcap is not None:

        def score_mod(score, batch, head, q_idx, kv_idx):
            import torch

            return torch.tanh(score / softcap) * softcap

    options = {"score_mod": score_mod, "block_mask": attention_mask, "enable_gqa": gqa, "scale": scaling}
    if query.device.type == "cuda":
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        out = compile_friendly_flex_attention(query, key, value, training=module.training, **options)
    else:
        out = eager_flex(query, key, value, **options)
    return out.transpose(1, 2).contiguous(), None


def _refuse_unknown(module, query, key, kwargs: dict) -> None:
    """Fail on what neither packed path implements, rather than attend differently from the model."""
    extra = sorted(
        k for k, v in kwargs.items() if k not in _INERT_KWARGS and k != "is_causal" and v is not None and v is not False
    )
    if extra:
        raise RuntimeError(
            f"packed attention does not implement the attention argument(s) {', '.join(extra)} "
            f"of {type(module).__name__}; add the family to the fallback in plan_attention"
        )
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise RuntimeError(f"{type(module).__name__} attends bidirectionally; packed attention is causal only")
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("packed attention is for training forwards without a cache (queries = keys)")
