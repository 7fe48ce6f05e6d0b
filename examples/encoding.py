"""The miniature retriever's encoding convention (RepLLaMA's, at small lengths).

- Query text ``query: {q}``; passage text ``passage: {title} {text}`` (just ``passage: {text}`` without a title).
- Tokenized with no special tokens (SmolLM2's tokenizer adds no BOS), truncated to ``max_length - 1`` tokens, then
  the EOS token (``<|im_end|>``, id 2) appended, so every sequence ends in EOS even when truncated.
- Right padding with the pad token (also ``<|im_end|>``: pad == EOS, so the last real token is found from the
  attention mask, never from the ids).
- Pooling: **mean** over the real tokens (EOS included) of the final hidden states (after the last norm).
  RepLLaMA pools the last token (the EOS); `last_token_pool` implements that and ``pooling="last"`` selects it, but
  on SmolLM2-135M it does not train from scratch in a CPU budget: the untrained EOS state carries no relevance signal
  (in-batch MRR 0.08 = chance, mean pooling 0.38), and every last-token run from a fresh LoRA collapsed all vectors
  together (cosine 0.93-0.98) with the loss stuck at ln(batch passages). Warm-started from the mean-pooling
  retriever it did train (60 steps, lr 3e-4, temperature 0.01); see docs/results.md section 1.
- L2-normalized; similarity is the inner product (= cosine).
- Length: at most 128 tokens (EOS included) for queries and passages, in training and evaluation alike.

This is `reforge eval`'s ``repllama`` profile with ``pooling`` mean and ``max_length`` 128 (``reforge/eval/encode.py``
tokenizes the same way: SmolLM2's tokenizer adds no special tokens, so truncating to 127 and appending EOS gives the
same ids); the adapter folder carries it as ``reforge_encoding.json`` so `reforge eval` picks it up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
MAX_LENGTH = 128
POOLING = "mean"
POOLINGS = ("mean", "last")


def format_query(text: str) -> str:
    """``query: {text}``."""
    return f"{QUERY_PREFIX}{text}"


def format_passage(title: str, text: str) -> str:
    """``passage: {title} {text}``, or ``passage: {text}`` without a title (the title-text part stripped, as
    `reforge.data.beir.Document.passage` does)."""
    return PASSAGE_PREFIX + (f"{title} {text}".strip() if title else text.strip())


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict:
    """Token ids with EOS appended after truncation, right-padded into ``input_ids`` and ``attention_mask`` tensors.

    Args:
        tokenizer: a transformers tokenizer with ``eos_token_id`` and ``pad_token_id``.
        texts: already formatted texts (`format_query` / `format_passage`).
        max_length: the length of the longest sequence, EOS included (at least 2).
    """
    import torch

    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one token and the EOS), got {max_length}.")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("the tokenizer needs an EOS and a pad token; run examples.prepare_base to set them.")
    rows = [ids[: max_length - 1] + [eos] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def last_token_pool(hidden, attention_mask):
    """The hidden state of each row's last real token: ``(batch, seq, dim), (batch, seq) -> (batch, dim)``.

    Works for right padding (the last 1 of the mask) and for left padding (every row ends with a real token).
    """
    import torch

    if bool(attention_mask[:, -1].all()):  # left padding, or no padding at all
        return hidden[:, -1]
    last = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_pool(hidden, attention_mask):
    """Mean of the hidden states over each row's real tokens: ``(batch, seq, dim), (batch, seq) -> (batch, dim)``."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def embed(model, batch: dict, pooling: str = POOLING):
    """Run a bare model (LlamaModel) on a tokenized batch; return L2-normalized pooled embeddings (float32).

    ``pooling`` is ``mean`` (this retriever's) or ``last`` (RepLLaMA's last token).
    """
    import torch.nn.functional as F

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}.")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.float()
    pool = mean_pool if pooling == "mean" else last_token_pool
    return F.normalize(pool(hidden, batch["attention_mask"]), dim=-1)


def encode(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int,
    pooling: str = POOLING,
    batch_size: int = 32,
    progress: Callable[[int, int | None], None] | None = None,
):
    """Embed formatted texts with no gradient; returns a float32 numpy array ``(len(texts), dim)`` in input order.

    Texts are batched in order of token length (less padding); ``progress(done, total)`` counts texts.
    """
    import numpy as np
    import torch

    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = embed(model, tokenize(tokenizer, [texts[i] for i in chunk], max_length), pooling).numpy()
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return out
