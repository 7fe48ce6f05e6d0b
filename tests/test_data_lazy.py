"""The corpus of a loaded BEIR dataset is read lazily through a cached byte-offset index: same documents, same
hash and same subsets as reading it whole, and a second load does not read the corpus again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from reforge.data.beir import BeirDataset, iter_corpus, load_beir
from reforge.data.lazy import LazyCorpus
from reforge.io.paths import cache_dir

SCIFACT = DATA / "scifact"
pytestmark = pytest.mark.skipif(not SCIFACT.is_dir(), reason="needs ../shared/data/scifact")


def _index_files() -> list[Path]:
    return sorted(cache_dir("corpus-index").glob("*.npz"))


def test_lazy_corpus_reads_the_same_documents_hash_and_subsets():
    lazy = load_beir(SCIFACT)
    assert isinstance(lazy.corpus, LazyCorpus) and len(lazy.corpus) == 5183
    whole = list(iter_corpus(SCIFACT))
    eager = BeirDataset(lazy.name, lazy.split, tuple(whole), lazy.queries, lazy.qrels)
    assert list(lazy.corpus) == whole
    assert lazy.corpus[0] == whole[0] and lazy.corpus[-1] == whole[-1] and lazy.corpus[100:103] == whole[100:103]
    assert lazy.corpus_hash == eager.corpus_hash  # the embedding cache key does not depend on how it was read
    ids = [d.id for d in whole[::7]]
    small_lazy, small_eager = lazy.subset(doc_ids=ids), eager.subset(doc_ids=ids)
    assert list(small_lazy.corpus) == list(small_eager.corpus) and small_lazy.corpus_hash == small_eager.corpus_hash
    assert lazy.files_sha256["corpus"] == __import__("reforge.io.checkpoint", fromlist=["x"]).sha256_file(
        SCIFACT / "corpus.jsonl"
    )


def test_the_offset_index_is_built_once_and_rebuilt_when_the_file_changes(tmp_path):
    from test_data_beir import write_beir

    folder = write_beir(tmp_path / "toy")
    first = load_beir(folder)
    (index_file,) = _index_files()
    with np.load(index_file) as data:
        arrays = {k: data[k] for k in data.files}
    facts = bytes(arrays["facts"]).decode().replace(first.corpus_hash, "f" * 64)
    np.savez(index_file, **{**arrays, "facts": np.frombuffer(facts.encode(), dtype=np.uint8)})
    assert load_beir(folder).corpus_hash == "f" * 64  # read from the cached index, not from the corpus
    corpus = folder / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + '{"_id": "new", "text": "one more"}\n')
    again = load_beir(folder)
    assert len(again.corpus) == len(first.corpus) + 1 and again.corpus[-1].id == "new"
    assert again.corpus_hash not in ("f" * 64, first.corpus_hash) and len(_index_files()) == 2


def test_lazy_corpora_compare_by_documents():
    lazy = load_beir(SCIFACT).corpus
    assert lazy == load_beir(SCIFACT).corpus and lazy.select(["4983", "5836"]) == lazy.select(["5836", "4983"])
    assert lazy.select(["4983"]) == (lazy[0],) and lazy.select(["4983"]) != lazy.select(["5836"])


@pytest.mark.parametrize("damage", ["empty", "cut", "flipped"])
def test_a_damaged_offset_index_is_rebuilt(tmp_path, damage):
    from test_data_beir import write_beir
    from test_train_corpus import _damaged

    folder = write_beir(tmp_path / "toy")
    first = load_beir(folder)
    (index_file,) = _index_files()
    index_file.write_bytes(_damaged(index_file.read_bytes(), damage))
    again = load_beir(folder)
    assert list(again.corpus) == list(first.corpus) and again.corpus_hash == first.corpus_hash


def test_a_corpus_replaced_by_one_of_the_same_size_and_time_is_indexed_again(tmp_path):
    from test_data_beir import write_beir

    folder = write_beir(tmp_path / "toy")
    first = load_beir(folder)
    corpus = folder / "corpus.jsonl"
    before = corpus.stat()
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(corpus.read_bytes().replace(b'"d1"', b'"e1"'))
    os.replace(edited, corpus)
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = load_beir(folder)
    assert again.corpus[0].id == "e1" and again.corpus_hash != first.corpus_hash


def test_a_corpus_edited_after_it_was_indexed_is_refused_not_read_as_other_documents(tmp_path):
    from test_data_beir import write_beir

    from reforge.errors import DataError

    folder = write_beir(tmp_path / "toy")
    corpus = load_beir(folder).corpus
    path = folder / "corpus.jsonl"
    path.write_bytes(path.read_bytes().replace(b"cats purr", b"cats purr all day"))  # the next lines move
    for read in (lambda: corpus[1], lambda: corpus[1:], lambda: list(corpus.select(["d3"]))):
        with pytest.raises(DataError, match=r"corpus.jsonl changed since it was indexed: byte \d+ no longer starts"):
            read()
