"""From documents to training batches: tokenize, lay out the steps, pack, order, and collate.

Each document becomes ``tokens(text)[: max_length - 1] + [EOS]`` (the tokenizer's own BOS, if it adds one, stays
first), so every document is truncated exactly as if it were trained alone: the paper's "max length of 1024 for
any example".

Three ways to fill an optimizer step (``TrainConfig.batching``):

- ``documents`` (default, the paper's): a step is ``global_batch`` documents in random order, exactly what a padded
  batch of them would be, and its loss is the mean over their predicted tokens, as a padded batch's is. The step's
  documents are then packed into rows of at most ``max_length`` tokens, so no compute goes to padding.
- ``rows``: whole documents are first packed into rows, and a step is ``global_batch`` rows: more documents per
  step, so fewer optimizer steps than the paper's recipe (a deviation, kept as a speed option).
- ``grouped``: one document per row, a step's documents of similar length, padded.

Packing (best fit, longest first) never splits a document. Position ids restart at 0 for every document and the
attention (`reforge.train.attention`) stays inside each document, so every token's loss equals its loss in an
unpacked run (checked in the tests).

The order depends only on the token lengths and the seed, so a resumed run and every rank see the same steps.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from reforge.data.clip import clip_texts, token_counter

if TYPE_CHECKING:
    import torch

IGNORE = -100
# Without packing, documents are shuffled, cut into windows of this many global batches, and sorted by length
# inside each window (like transformers' group_by_length): random order, little padding.
SORT_WINDOW_BATCHES = 32

Row = tuple[int, ...]
Encoder = Callable[[Sequence[str]], list[list[int]]]


def make_encoder(tokenizer, max_length: int) -> Encoder:
    """A function ``texts -> token id lists``: tokenizer's special tokens, truncated, EOS last (if it has one)."""
    eos = tokenizer.eos_token_id
    room = max_length - 1 if eos is not None else max_length

    def encode(texts: Sequence[str]) -> list[list[int]]:
        texts = clip_texts(texts, room, token_counter(tokenizer))  # a huge document costs what is kept
        ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=room)["input_ids"]
        return [list(row) + [eos] for row in ids] if eos is not None else [list(row) for row in ids]

    return encode


def token_lengths(encode: Encoder, texts: Sequence[str], *, chunk: int = 1024) -> np.ndarray:
    """Token count of each text as `make_encoder` cuts it, tokenizing ``chunk`` texts at a time."""
    lengths = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), chunk):
        lengths[start : start + chunk] = [len(ids) for ids in encode(list(texts[start : start + chunk]))]
    return lengths


def pack_rows(lengths: np.ndarray, max_length: int) -> list[Row]:
    """Best-fit-decreasing bin packing of documents into rows of at most ``max_length`` tokens.

    Documents go longest first into the fullest row they still fit in, which leaves a few percent of padding on
    real corpora. Deterministic: ties keep document order. O(n log max_length).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free room -> rows with exactly that much room left
    rooms: list[int] = []  # sorted distinct free rooms that have rows
    for doc in order:
        need = int(lengths[doc])
        at = bisect.bisect_left(rooms, need)
        if at < len(rooms):
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(doc)
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(row)
    return [tuple(row) for row in rows]


@dataclass(frozen=True)
class BatchPlan:
    """Which rows each optimizer step trains on.

    Fields: ``rows`` (tuples of document indices: one document each, except with ``batching="rows"``),
    ``lengths`` (tokens per document), ``global_batch`` (rows per optimizer step, over all micro-steps and ranks),
    ``batching``, ``seed``, ``max_length`` (the most tokens `forward_groups` packs into one row).
    """

    rows: list[Row]
    lengths: np.ndarray
    global_batch: int
    batching: str
    seed: int
    max_length: int

    @classmethod
    def build(cls, lengths: np.ndarray, *, max_length: int, global_batch: int, batching: str, seed: int) -> "BatchPlan":
        """The rows of the documents whose token counts are ``lengths``: packed up front only for "rows"."""
        rows = pack_rows(lengths, max_length) if batching == "rows" else [(i,) for i in range(len(lengths))]
        return cls(rows, lengths, global_batch, batching, seed, max_length)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the rows (the last one may be short)."""
        return math.ceil(len(self.rows) / self.global_batch)

    def epoch_steps(self, epoch: int) -> list[list[Row]]:
        """The rows of each optimizer step of ``epoch``, in training order (seeded by ``seed + epoch``)."""
        rng = np.random.default_rng(self.seed + epoch)
        order = rng.permutation(len(self.rows))
        if self.batching == "grouped":
            window = self.global_batch * SORT_WINDOW_BATCHES
            row_len = np.array([int(self.lengths[row[0]]) for row in self.rows])
            order = np.concatenate(
                [sorted(order[i : i + window], key=lambda r: -row_len[r]) for i in range(0, len(order), window)]
            ).astype(np.int64)
        steps = [
            [self.rows[r] for r in order[i : i + self.global_batch]] for i in range(0, len(order), self.global_batch)
        ]
        if self.batching == "grouped":  # keep each step's similar lengths together, visit the steps at random
            steps = [steps[i] for i in rng.permutation(len(steps))]
        return steps

    def row_tokens(self, row: Row) -> int:
        """Tokens in a row (before padding)."""
        return sum(int(self.lengths[d]) for d in row)

    def pack_micro(self, rows: list[Row]) -> list[Row]:
        """The rows a micro-batch is fed as. With "documents", its documents packed into rows of at most
        ``max_length`` tokens (the step's content and loss do not change, only where each document sits);
        otherwise ``rows`` as they are."""
        if self.batching != "documents" or not rows:
            return rows
        docs = [d for row in rows for d in row]
        return [tuple(docs[i] for i in row) for row in pack_rows(self.lengths[docs], self.max_length)]

    def forward_groups(self, rows: list[Row], budget: int | None, *, packed: bool = True) -> list[list[Row]]:
        """Pack a micro-batch (`pack_micro`) and cut it into the groups of consecutive rows that go through the
        model together: as many as fit ``budget`` padded tokens (at least one row each); all of them when
        ``budget`` is None. With ``packed`` False (``--attention padded``), one document per row instead, in the
        order the step holds them."""
        rows = self.pack_micro(rows) if packed else [(d,) for row in rows for d in row]
        if budget is None or not rows:
            return [rows]
        groups: list[list[Row]] = []
        widest = 0
        for row in rows:
            width = self.row_tokens(row)
            if groups and max(widest, width) * (len(groups[-1]) + 1) <= budget:
                groups[-1].append(row)
                widest = max(widest, width)
            else:
                groups.append([row])
                widest = width
        return groups

    def padding(
        self, batch_size: int, world_size: int, grad_accum: int, budget: int | None = None, *, packed: bool = True
    ) -> tuple[int, int]:
        """``(real tokens, pad tokens)`` of one epoch as `collate` pads each forward group to its longest row."""
        real = pad = 0
        for step in self.epoch_steps(0):
            for micro in split_step(
                step, rank_count=world_size, batch_size=batch_size, grad_accum=grad_accum, flat=True
            ):
                for group in self.forward_groups(micro, budget, packed=packed):
                    sizes = [self.row_tokens(row) for row in group]
                    if sizes:
                        real += sum(sizes)
                        pad += max(sizes) * len(sizes) - sum(sizes)
        return real, pad


def split_step(
    step: list[Row], *, rank: int = 0, rank_count: int = 1, batch_size: int, grad_accum: int, flat: bool = False
) -> list[list[Row]]:
    """The micro-batches of one optimizer step for ``rank``: micro-step ``a`` gets rows
    ``[(a * rank_count + rank) * batch_size, ... + batch_size)``. With ``flat``, every rank's micro-batches."""
    ranks = range(rank_count) if flat else (rank,)
    return [
        step[(a * rank_count + r) * batch_size : (a * rank_count + r + 1) * batch_size]
        for a in range(grad_accum)
        for r in ranks
    ]


@dataclass(frozen=True)
class Batch:
    """One micro-batch of tensors. ``targets[b, t]`` is the token to predict at position t (``IGNORE`` at each
    document's last token and on padding). ``real`` counts non-pad input tokens, ``pad`` pad positions.
    ``attention_mask`` (1 on tokens, 0 on padding) only for unpacked rows (`collate` with ``padded``); packed rows
    carry their documents in ``position_ids`` instead."""

    input_ids: "torch.Tensor"
    position_ids: "torch.Tensor"
    targets: "torch.Tensor"
    real: int
    pad: int
    attention_mask: "torch.Tensor | None" = None

    @property
    def predicted(self) -> int:
        """Tokens that carry a loss."""
        return int((self.targets != IGNORE).sum())


def collate(rows: list[list[list[int]]], pad_id: int, *, padded: bool = False) -> Batch:
    """Tensors for rows of tokenized documents, right-padded to the longest row.

    Packed (default): the padding is one more pseudo-document whose positions restart at 0. ``padded``: one
    document per row, positions 0.. to the row's end, and an ``attention_mask`` that hides the padding (the model's
    own attention, as HF Trainer feeds it).

    An empty ``rows`` (a rank with nothing left at the end of an epoch) gives one pad token with no loss, so every
    rank still runs a forward and backward and distributed training does not stall.
    """
    import torch

    if not rows:
        zero = torch.zeros((1, 1), dtype=torch.long)
        return Batch(zero + pad_id, zero, zero + IGNORE, 0, 0, torch.ones_like(zero) if padded else None)
    if padded and any(len(row) != 1 for row in rows):
        raise ValueError("padded batches hold one document per row")
    width = max(sum(len(doc) for doc in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    real = 0
    for b, row in enumerate(rows):
        at = 0
        for doc in row:
            n = len(doc)
            ids = torch.tensor(doc, dtype=torch.long)
            input_ids[b, at : at + n] = ids
            position_ids[b, at : at + n] = torch.arange(n)
            targets[b, at : at + n - 1] = ids[1:]
            at += n
        # padding: one more pseudo-document, no loss (packed); or the row's positions go on, masked (padded)
        position_ids[b, at:] = torch.arange(at, width) if padded else torch.arange(width - at)
        real += at
    lengths = torch.tensor([len(row[0]) for row in rows]) if padded else None
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long() if padded else None
    return Batch(input_ids, position_ids, targets, real, len(rows) * width - real, mask)
