"""Huge documents are cut in characters before tokenizing, and the kept tokens are exactly those of the whole text
(real tokenizers: WordPiece of all-MiniLM-L6-v2, byte-level BPE of SmolLM2), in eval and in train."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import DATA
from reforge.data.beir import iter_corpus
from reforge.data.clip import CHARS_PER_TOKEN, clip_texts, token_counter

MODELS = Path(os.environ.get("REFORGE_MODELS", Path.home() / ".cache" / "reforge-models"))
TOKENIZERS = ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"]


def _long_texts() -> list[str]:
    docs = [d.passage() for _, d in zip(range(400), iter_corpus(DATA / "scifact"))]
    joined = " ".join(docs)
    return [
        joined[:200_000],  # ordinary prose, far past any max length
        "\n\n".join(docs[:60]) + "   \t  " * 3000,  # paragraphs, then a long run of whitespace
        "x" * 50_000 + " tail",  # one giant word first
        ("word " * 30) + "é" * 20_000,  # multi-byte characters with no whitespace
        "a short passage",  # short: untouched
    ]


@pytest.mark.skipif(not (DATA / "scifact").is_dir(), reason="needs ../shared/data/scifact")
@pytest.mark.parametrize("name", TOKENIZERS)
def test_clipped_texts_keep_exactly_the_tokens_of_the_whole_text(name):
    from transformers import AutoTokenizer

    if not (MODELS / name).is_dir():
        pytest.skip(f"needs {MODELS / name}")
    tokenizer = AutoTokenizer.from_pretrained(MODELS / name)
    texts = _long_texts()
    for limit in (16, 255, 511):
        clipped = clip_texts(texts, limit, token_counter(tokenizer))
        assert len(clipped[0]) <= limit * CHARS_PER_TOKEN and clipped[-1] == texts[-1]
        whole = tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        cut = tokenizer(clipped, truncation=True, max_length=limit)["input_ids"]
        assert cut[:2] == whole[:2] and cut[4:] == whole[4:]
        # a word longer than the window is the one case that may differ: only its last kept token
        assert cut[2][:-2] == whole[2][:-2] and cut[3][:-2] == whole[3][:-2]


def test_a_huge_document_costs_what_max_length_keeps():
    from transformers import AutoTokenizer

    from reforge.eval.encode import _tokenize
    from reforge.profiles import EncodingProfile

    if not (MODELS / "all-MiniLM-L6-v2").is_dir():
        pytest.skip("needs all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "all-MiniLM-L6-v2")
    huge = "cells divide and proteins fold " * 400_000  # 12 MB, one line
    profile = EncodingProfile(name="custom", pooling="mean", normalize=True, max_length=128)

    class Bare:  # what _tokenize asks of a model: the arguments of its forward
        def forward(self, input_ids, attention_mask): ...

    # what reaches the tokenizer is a few thousand characters, not 12 MB (whole: about 30 s and several GB)
    assert len(clip_texts([huge], 128, token_counter(tokenizer))[0]) < 16 * 128 + 64
    inputs = _tokenize(tokenizer, [huge, "short text"], profile, Bare())
    assert inputs["input_ids"].shape == (2, 128)


def test_training_encoder_cuts_huge_documents_to_the_same_tokens():
    from transformers import AutoTokenizer

    from reforge.train.batching import make_encoder

    if not (MODELS / "SmolLM2-135M-Instruct").is_dir():
        pytest.skip("needs SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "SmolLM2-135M-Instruct")
    huge = "the adapter reads every passage of the corpus once. " * 200_000  # 10 MB
    assert len(clip_texts([huge], 63, token_counter(tokenizer))[0]) < 16 * 63 + 64
    (ids,) = make_encoder(tokenizer, 64)([huge])
    whole = tokenizer([huge[:20_000]], truncation=True, max_length=63)["input_ids"][0]
    assert ids == list(whole) + [tokenizer.eos_token_id]
