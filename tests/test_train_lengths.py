"""Token lengths are counted once per corpus, tokenizer and cut, cached, and reused by later runs (dry runs and
resumes plan from the cache instead of re-tokenizing the corpus)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from test_train import SCIFACT, build_tokenizer, config  # noqa: F401

from reforge.train.batching import make_encoder, token_lengths
from reforge.train.dora import setup_data
from reforge.train.lengths import lengths_key, tokenizer_identity


def _cached() -> list[Path]:
    return sorted((Path(os.environ["REFORGE_HOME"]) / "cache" / "token-lengths").glob("*.npy"))


def test_lengths_are_counted_once_then_read_from_the_cache(tmp_path):
    tokenizer = build_tokenizer()
    cfg = config("base", tmp_path / "psi", max_docs=12, max_length=64)
    first = setup_data(cfg, tokenizer)
    (path,) = _cached()
    texts = [doc.text for doc in first.corpus.docs]
    counted = token_lengths(make_encoder(tokenizer, 64), texts)
    assert (first.plan.lengths == counted).all() and (np.load(path) == counted).all()
    assert np.load(path).dtype == np.uint32  # 4 bytes a document
    np.save(path, np.full(12, 7, dtype=np.uint32))  # if the next run reads the cache, it sees these
    assert (setup_data(cfg, tokenizer).plan.lengths == 7).all()
    shorter = setup_data(config("base", tmp_path / "psi", max_docs=12, max_length=32), tokenizer)
    assert len(_cached()) == 2 and shorter.plan.lengths.max() <= 32  # another cut, another entry
    fewer = setup_data(config("base", tmp_path / "psi", max_docs=11, max_length=64), tokenizer)
    assert len(_cached()) == 3 and (fewer.plan.lengths == counted[:11]).all()  # another corpus, another entry
    path.write_bytes(path.read_bytes()[:100])  # a damaged entry is counted again and replaced
    assert (setup_data(cfg, tokenizer).plan.lengths == counted).all() and (np.load(path) == counted).all()


def test_the_key_follows_the_tokenizer_definition_not_its_name():
    one, two = build_tokenizer(), build_tokenizer()
    assert tokenizer_identity(one) == tokenizer_identity(two)  # trained alike: same definition
    two.backend_tokenizer.post_processor = None  # no BOS any more: other ids, other key
    assert tokenizer_identity(one) != tokenizer_identity(two)
    assert lengths_key("c", one, 64) != lengths_key("c", one, 65) != lengths_key("d", one, 64)
