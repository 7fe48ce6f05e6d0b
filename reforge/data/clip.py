"""Cut texts in characters before tokenizing, so a huge document costs what ``max_length`` keeps, not its size.

A 48 MB single-line document tokenized whole takes gigabytes (every token id, offset and encoding object) only to be
truncated to a few hundred tokens. `clip_texts` cuts each long text at its last whitespace within ``CHARS_PER_TOKEN``
characters per kept token, counts the tokens of the cut text, and keeps the cut only if it still holds more tokens
than will be kept; otherwise it widens the window (4x) and tries again, up to the whole text. Cutting at whitespace
leaves every complete word before the cut as it was, so with tokenizers that split words at whitespace (WordPiece,
byte-level BPE, SentencePiece) the kept tokens are exactly those of the whole text (tested on real tokenizers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

CHARS_PER_TOKEN = 16  # English averages ~4 characters per token; 16 leaves a wide margin


def token_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    """``texts -> token counts`` without special tokens or truncation (what `clip_texts` checks a cut with)."""

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]]

    return count


def clip_texts(texts: Sequence[str], max_tokens: int, count: Callable[[list[str]], list[int]]) -> list[str]:
    """``texts`` with each one longer than ``max_tokens * CHARS_PER_TOKEN`` characters cut where the cut cannot
    change its first ``max_tokens`` tokens (see the module docstring); shorter texts are returned as they are.

    Example:
        >>> clip_texts(["a " * 40], 1, lambda texts: [len(t.split()) for t in texts])
        ['a a a a a a a a']
    """
    out = list(texts)
    window = max(1, max_tokens) * CHARS_PER_TOKEN
    pending = [i for i, text in enumerate(texts) if len(text) > window]
    while pending:
        cuts = [_cut(texts[i], window) for i in pending]
        counts = count(cuts)
        window *= 4
        retry = []
        for i, cut, tokens in zip(pending, cuts, counts):
            if tokens > max_tokens:
                out[i] = cut
            elif len(texts[i]) > window:
                retry.append(i)
        pending = retry  # the others keep their whole text (it fits the widened window)
    return out


def _cut(text: str, window: int) -> str:
    """``text[:window]`` up to its last whitespace (a text with no whitespace there is cut mid-word: the only case
    where the last kept token can differ from the whole text's)."""
    head = text[:window]
    for at in range(len(head) - 1, 0, -1):
        if head[at].isspace():
            return head[:at]
    return head
