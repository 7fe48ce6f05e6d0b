"""Attention for packed rows: causal attention inside each document, nothing across documents.

transformers can isolate packed documents itself (position ids that restart at 0, no attention mask), but with
``sdpa`` it does so through a full (row x row) mask, which sends PyTorch to its slow masked kernels: on CPU a
packed 4 x 1024 step took 1.6x as long as the same step with plain causal attention. Here each document is
instead cut out of the row and given to ``scaled_dot_product_attention(is_causal=True)`` on its own, the
pattern flash-attention's varlen kernels use: the fast causal kernels, and work in the sum of squared document
lengths rather than the square of the row length.

Registered with transformers' `AttentionInterface` under `PACKED_ATTENTION`; models loaded with
``attn_implementation=PACKED_ATTENTION`` get no mask from transformers (a custom implementation has none) and
read the document boundaries from ``position_ids``. Such a model drops any 2-D padding mask (transformers builds
no mask for a custom implementation), so it is only for the rows `reforge.train.batching.collate` makes, whose
padding is a pseudo-document of its own.
"""

from __future__ import annotations

PACKED_ATTENTION = "reforge_packed_sdpa"


def register_packed_attention() -> str:
    """Make `PACKED_ATTENTION` known to transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    return PACKED_ATTENTION


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention signature: ``query`` (batch, heads, L, dim), ``key``/``value`` (batch, kv heads,
    L, dim); returns ``(output (batch, L, heads, dim), None)``. A document starts wherever a position id is not
    the previous one plus 1. Anything other than a plain training forward (a mask, a cache) goes to sdpa."""
    import torch
    import torch.nn.functional as F

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    batch, heads, length, dim = query.shape
    positions = position_ids.expand(batch, length)
    starts = positions[:, 1:] != positions[:, :-1] + 1

    drop = dropout if module.training else 0.0

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, scale=scaling)

    if query.device.type != "cpu":  # one masked call per layer: see block_causal_mask
        mask = block_causal_mask(starts)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=drop, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    if not bool(starts.any()):
        return attend(query, key, value).transpose(1, 2).contiguous(), None
    # The rows side by side as one sequence per head, cut into documents by one `split`, whose backward is one
    # `cat` (slicing each document out instead would zero-fill a full-size gradient per document).
    cuts = [b * length + c for b in range(batch) for c in (0, *(starts[b].nonzero().flatten() + 1).tolist())]
    sizes = [end - begin for begin, end in zip(cuts, [*cuts[1:], batch * length])]
    pieces = [t.transpose(0, 1).reshape(1, heads, batch * length, dim).split(sizes, dim=2)
              for t in (query, key, value)]
    out = torch.cat([attend(q, k, v) for q, k, v in zip(*pieces)], dim=2)
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None


def block_causal_mask(starts):
    """``(batch, 1, L, L)`` booleans: position i may attend to j when j <= i in the same document.

    ``starts`` is ``(batch, L - 1)``, True where a document begins at the next position. On a GPU one masked
    attention call per layer replaces the per-document calls: those cost more in Python, kernel launches and host
    syncs than in arithmetic there (a 135M model trained at 5,800 tokens/s on an H100 with them, docs/results.md),
    while the masked kernel is not the slow path it is on CPU. Same result (tests/test_train.py).
    """
    import torch

    batch, length = starts.shape[0], starts.shape[1] + 1
    document = torch.cat([starts.new_zeros(batch, 1, dtype=torch.long), starts.long().cumsum(1)], dim=1)
    causal = torch.ones(length, length, dtype=torch.bool, device=starts.device).tril()
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]
