"""Texts -> vectors with a loaded `Retriever` and an `EncodingProfile`.

Texts are sorted by length (longest first, as sentence-transformers does) so each batch pads little, encoded under
``torch.inference_mode``, pooled in float32 and put back in input order. `shard_indices` splits that length order
across ranks so every rank gets a similar amount of work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any

import numpy as np

from reforge.data.clip import clip_texts, token_counter
from reforge.errors import NonFiniteError
from reforge.eval.model import Retriever
from reforge.eval.pooling import pool
from reforge.io.progress import ProgressFn
from reforge.profiles import EncodingProfile

__all__ = ["encode", "length_order", "passages", "pool", "shard_indices"]


def passages(documents: Sequence[Any], profile: EncodingProfile) -> list[str]:
    """The passage text of each document under ``profile``: prefix + title + separator + text."""
    return [profile.passage_prefix + doc.passage(profile.title_separator) for doc in documents]


def length_order(texts: Sequence[str]) -> list[int]:
    """Indices of ``texts`` from longest to shortest (stable), the order batches are built in."""
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


def shard_indices(texts: Sequence[str], rank: int, world_size: int) -> list[int]:
    """The indices rank ``rank`` of ``world_size`` encodes: every ``world_size``-th text of the length order.

    Shards are disjoint, cover every index, and differ in size by at most one text; striding through the length
    order gives each rank a similar mix of long and short texts.

    Example:
        >>> shard_indices(["a", "bbb", "cc", "dddd"], 0, 2), shard_indices(["a", "bbb", "cc", "dddd"], 1, 2)
        ([3, 2], [1, 0])
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return length_order(texts)[rank::world_size]


def encode(
    retriever: Retriever,
    texts: Sequence[str],
    profile: EncodingProfile,
    *,
    batch_size: int = 32,
    max_batch_tokens: int | None = None,
    tokenize_ahead: bool | None = None,
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Encode ``texts`` (prefixes already applied) into a float32 array of shape ``(len(texts), dim)``.

    Args:
        retriever: the loaded model and tokenizer.
        texts: full texts to encode, in the order wanted back.
        profile: pooling, max length, EOS, lower-casing and normalization.
        batch_size: texts per forward pass, when batches are not sized by tokens.
        max_batch_tokens: size batches by tokens instead: as many texts (in length order, at least one) as fit
            this many padded positions. Default: ``batch_size * 512`` on a GPU, where short texts then go many
            to a batch; None on CPU (``batch_size`` texts).
        tokenize_ahead: tokenize the next window of texts in a worker thread while the model encodes this one
            (fast tokenizers release the GIL). Default: on a GPU only; on CPU the two would share the cores.
        device: where the inputs go (default: the model's device).
        progress: called as ``progress(done, total)`` after each batch.
    """
    import torch

    model, tokenizer = retriever.model, retriever.tokenizer
    device = device or str(next(model.parameters()).device)
    if not texts:
        return np.zeros((0, _hidden_size(model)), dtype=np.float32)
    cuda = torch.device(device).type == "cuda"
    if max_batch_tokens is None and cuda:
        max_batch_tokens = batch_size * 512
    order = length_order(texts)
    out: np.ndarray | None = None
    total, done = len(texts), 0
    if progress:
        progress(0, total)
    window = batch_size * 32  # texts tokenized at a time, ahead of the batches cut from them
    windows = [order[start : start + window] for start in range(0, total, window)]

    def tokenize(chosen: list[int]) -> tuple[list[list[int]], bool]:
        return _token_ids(tokenizer, [texts[i] for i in chosen], profile, model)

    ahead = cuda if tokenize_ahead is None else tokenize_ahead
    # Each batch's vectors leave the device while the next batch computes: the copy is queued (pinned, non-blocking
    # on CUDA) and only waited for, and stored, after the next forward pass has been queued behind it.
    in_flight: list[tuple[list[int], Any, Any]] = []

    def store_in_flight() -> None:
        for rows, host, copied in in_flight:
            if copied is not None:
                copied.synchronize()
            out[rows] = host.numpy()
        in_flight.clear()

    with torch.inference_mode(), _in_order(tokenize, windows, background=ahead) as tokenized:
        for chosen, (ids, token_types) in zip(windows, tokenized):
            for batch in _cut(len(chosen), [len(row) for row in ids], batch_size, max_batch_tokens):
                inputs = _pad([ids[j] for j in batch], tokenizer, profile, token_types)
                inputs = {
                    k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device))
                    for k, v in inputs.items()
                }
                hidden = model(**inputs).last_hidden_state
                vectors = retriever.finish(pool(hidden, inputs["attention_mask"], profile.pooling, False), profile)
                if out is None:
                    out = np.empty((total, vectors.shape[1]), dtype=np.float32)
                host, copied = _to_host(vectors.float(), cuda)
                store_in_flight()
                in_flight.append(([chosen[j] for j in batch], host, copied))
                done += len(batch)
                if progress:
                    progress(done, total)
        store_in_flight()
    assert out is not None
    _check_finite_vectors(out, retriever.name, texts)
    return out


def _check_finite_vectors(vectors: np.ndarray, name: str, texts: Sequence[str]) -> None:
    """A NaN or Inf vector (a model or an in-memory merge gone wrong) is an error, never a score of 0.0."""
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise NonFiniteError(
            f"{name} encoded {bad.size} of {len(texts)} text(s) as NaN or Inf (first: text {int(bad[0])}, "
            f"{texts[int(bad[0])][:60]!r}); its scores would mean nothing.",
            hint="Check the model's weights (`reforge verify`) and --dtype (float16 overflows in some models).",
            tensor=None,
            path=None,
        )


def _to_host(vectors: Any, cuda: bool) -> tuple[Any, Any]:
    """``(host tensor, event)``: on CUDA a non-blocking copy into pinned memory and the event that marks it done
    (torch caches pinned blocks, so this allocates once per batch shape); elsewhere a plain copy and None."""
    import torch

    if not cuda:
        return vectors.cpu(), None
    host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
    host.copy_(vectors, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


@contextmanager
def _in_order(fn: Callable[[Any], Any], items: list[Any], *, background: bool) -> Iterator[Iterator[Any]]:
    """``fn(item)`` for each item, in order; with ``background``, the next one is computed in a worker thread
    while the caller uses the current one."""
    if not background:
        yield (fn(item) for item in items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as worker:

        def results() -> Iterator[Any]:
            pending = worker.submit(fn, items[0]) if items else None
            for i in range(len(items)):
                current = pending.result()
                pending = worker.submit(fn, items[i + 1]) if i + 1 < len(items) else None
                yield current

        yield results()


def _cut(count: int, lengths: list[int], batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Consecutive batches of ``range(count)``: ``batch_size`` each, or as many as fit ``max_batch_tokens`` padded
    positions (texts x the longest, at least one text)."""
    if max_batch_tokens is None:
        return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]
    batches: list[list[int]] = []
    longest = 0
    for j in range(count):
        width = max(1, lengths[j])
        if batches and max(longest, width) * (len(batches[-1]) + 1) <= max_batch_tokens:
            batches[-1].append(j)
            longest = max(longest, width)
        else:
            batches.append([j])
            longest = width
    return batches


def _token_ids(tokenizer: Any, texts: list[str], profile: EncodingProfile, model: Any) -> tuple[list[list[int]], bool]:
    """Token ids truncated to ``max_length`` (EOS appended after truncation if the profile says so), unpadded; and
    whether the model takes (all-zero) token type ids."""
    if profile.lowercase:
        texts = [t.lower() for t in texts]
    # max_length counts the EOS: room for it, unless the tokenizer appends it itself (its post-processor, as
    # Qwen3-Embedding's and a merged folder's sentence-transformers tokenizer do; truncation then leaves room)
    limit = profile.max_length - 1 if profile.append_eos and not _appends_eos(tokenizer) else profile.max_length
    texts = clip_texts(texts, limit, token_counter(tokenizer))  # a huge document costs what is kept
    # only the ids are asked for: the mask comes from `_pad`, token types are all zero (building the other lists
    # per text cost ~12% of tokenizing short passages)
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=limit,
        padding=False,
        add_special_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids = list(encoded["input_ids"])  # lists of ints already: not copied row by row
    eos = tokenizer.eos_token_id
    if profile.append_eos:
        if eos is None:
            raise ValueError("the profile appends EOS but the tokenizer has no eos_token_id")
        ids = [row if row and row[-1] == eos else row + [eos] for row in ids]
    # the tokenizer's own rule for returning token type ids (transformers: "token_type_ids" in model_input_names)
    return ids, "token_type_ids" in tokenizer.model_input_names and _accepts_token_types(model)


def _pad(ids: list[list[int]], tokenizer: Any, profile: EncodingProfile, token_types: bool) -> dict[str, Any]:
    """Rows padded on the profile's side, with their attention mask."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    rows = [row or [pad] for row in ids]  # nothing to encode (no special tokens, empty text): one pad token, seen
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    columns = np.arange(int(lengths.max()))
    if profile.padding_side == "left":
        filled = columns >= (len(columns) - lengths)[:, None]
    else:
        filled = columns < lengths[:, None]
    input_ids = np.full(filled.shape, pad, dtype=np.int64)
    # one vectorized copy, no tensor per row: a boolean mask fills row by row, left to right, i.e. each row's tokens
    # in order whichever side the padding is on
    input_ids[filled] = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(filled.astype(np.int64))}
    if token_types:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return inputs


def _tokenize(tokenizer: Any, texts: list[str], profile: EncodingProfile, model: Any) -> dict[str, Any]:
    """Token ids truncated to ``max_length`` (EOS appended after truncation if the profile says so), padded on the
    profile's side."""
    ids, token_types = _token_ids(tokenizer, texts, profile, model)
    return _pad(ids, tokenizer, profile, token_types)


def _appends_eos(tokenizer: Any) -> bool:
    eos = tokenizer.eos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return eos is not None and ids[-1:] == [eos] and tokenizer("a", add_special_tokens=False)["input_ids"][-1:] != [eos]


def _accepts_token_types(model: Any) -> bool:
    import inspect

    return "token_type_ids" in inspect.signature(model.forward).parameters


def _hidden_size(model: Any) -> int:
    return int(getattr(model.config, "hidden_size", 0))
