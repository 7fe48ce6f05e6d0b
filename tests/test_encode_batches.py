"""reforge.eval.encode with batches sized by tokens (the GPU default): the same vectors as batches of a fixed count,
every batch within its budget."""

from __future__ import annotations

import random

import numpy as np

from conftest import build_model, save_tokenizer
from reforge.eval.encode import encode
from reforge.eval.model import Retriever
from reforge.profiles import builtin_profile


def test_token_budget_batches_give_the_same_vectors(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path, 128)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = build_model("llama-bare").eval()
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(100)}" for _ in range(rng.randrange(1, 40))) for _ in range(37)]
    retriever = Retriever(model, tokenizer, "tiny", builtin_profile("last-token"))
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    by_count = encode(retriever, texts, retriever.profile, batch_size=8)
    counted = list(shapes)
    shapes.clear()
    by_tokens = encode(retriever, texts, retriever.profile, batch_size=8, max_batch_tokens=96)
    hook.remove()
    ahead = encode(retriever, texts, retriever.profile, batch_size=1, tokenize_ahead=True)  # windows of 32: 2
    np.testing.assert_allclose(ahead, by_count, rtol=0, atol=1e-5)
    np.testing.assert_allclose(by_tokens, by_count, rtol=0, atol=1e-5)
    assert [s[0] for s in counted] == [8, 8, 8, 8, 5]
    assert sum(s[0] for s in shapes) == len(texts)
    assert all(rows * width <= 96 or rows == 1 for rows, width in shapes)
    assert shapes[-1][0] > 8 > shapes[0][0]  # long texts few to a batch, short ones many


def test_rows_are_padded_on_the_profiles_side_and_an_empty_row_is_one_seen_pad_token():
    from dataclasses import replace
    from types import SimpleNamespace

    from reforge.eval.encode import _pad

    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    ids = [[5, 6, 7], [], [8], [9, 10]]
    right = _pad(ids, tokenizer, replace(builtin_profile("last-token"), padding_side="right"), True)
    assert right["input_ids"].tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0], [9, 10, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert right["token_type_ids"].tolist() == [[0] * 3] * 4
    left = _pad(ids, tokenizer, replace(builtin_profile("last-token"), padding_side="left"), False)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 0], [0, 0, 8], [0, 9, 10]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]
    assert set(left) == {"input_ids", "attention_mask"} and left["input_ids"].dtype == right["attention_mask"].dtype
    no_pad = SimpleNamespace(eos_token_id=None, pad_token_id=None)  # neither: 0
    assert _pad([[], [4]], no_pad, builtin_profile("last-token"), False)["input_ids"].tolist() == [[0], [4]]
