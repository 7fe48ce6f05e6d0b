"""One reader for JSONL corpora (reforge.data.lazy), used by eval and train: the same id rule and duplicate rule with
the same error text, and one cache layout in which an index of another format or kind is rebuilt, never misread."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from reforge.data.corpus import load_corpus
from reforge.data.lazy import (
    INDEX_FORMAT,
    corpus_index,
    file_stamp,
    index_key,
    index_path,
    load_npz,
    save_npz,
    text_hash,
)
from reforge.errors import DataError
from reforge.io.paths import cache_dir

ROWS = [
    {"_id": "d1", "title": "Cats", "text": "cats purr and sleep"},
    {"_id": "d2", "title": "", "text": "dogs bark loudly"},
    {"_id": "d3", "title": "Fish", "text": "fish swim in water"},
]


def _corpus(tmp_path: Path, rows=ROWS) -> Path:
    folder = tmp_path / "beir"
    folder.mkdir(exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder / "corpus.jsonl"


def _cached() -> list[Path]:
    return sorted(cache_dir("corpus-index").glob("*.npz"))


def _eval_error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        corpus_index(path)
    return str(info.value)


def _train_error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_corpus(path.parent)
    return str(info.value)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"_id": None, "text": "x"}, "line 2: '_id' is null, not a string or a number."),
        ({"_id": True, "text": "x"}, "line 2: '_id' is true, not a string or a number."),
        ({"_id": [1], "text": "x"}, "line 2: '_id' is a JSON array, not a string or a number."),
        ({"_id": {"a": 1}, "text": "x"}, "line 2: '_id' is a JSON object, not a string or a number."),
        ({"text": "x"}, "line 2: no '_id' field."),
        ({"_id": "d1", "text": "again"}, "line 2: duplicate document id 'd1' (first at line 1)."),
    ],
)
def test_eval_and_train_refuse_a_bad_id_with_the_same_words(tmp_path, row, expected):
    path = _corpus(tmp_path, [ROWS[0], row, ROWS[2]])
    eval_text, train_text = _eval_error(path), _train_error(path)
    assert eval_text == train_text and f"corpus.jsonl, {expected}" in eval_text


def test_numbers_are_ids_for_both_readers(tmp_path):
    path = _corpus(tmp_path, [{"_id": 7, "text": "seven"}, {"_id": 1.5, "text": "one and a half"}])
    assert [d.id for d in load_beir_corpus(path)] == ["7", "1.5"]
    assert [d.id for d in load_corpus(path.parent).docs] == ["7", "1.5"]


def load_beir_corpus(path: Path):
    from reforge.data.lazy import LazyCorpus

    return list(LazyCorpus(corpus_index(path)))


def test_eval_and_train_indexes_share_one_folder_and_one_naming(tmp_path):
    path = _corpus(tmp_path)
    index = corpus_index(path)
    load_corpus(path.parent)
    names = sorted(p.name.split("-")[0] for p in _cached())
    assert names == ["eval", "train"]
    eval_file = index_path("eval", index_key("eval", [path], []))
    assert eval_file in _cached()
    facts, arrays = load_npz(eval_file)
    assert (facts["format"], facts["kind"]) == (INDEX_FORMAT, "eval") and set(arrays) == {
        "offsets",
        "id_hashes",
        "text_hashes",
    }
    (train_file,) = [p for p in _cached() if p.name.startswith("train-")]
    facts, arrays = load_npz(train_file)
    assert (facts["format"], facts["kind"]) == (INDEX_FORMAT, "train") and set(arrays) == {
        "source",
        "where",
        "line",
        "check",
    }
    # the text hashes, computed from each part encoded once, are text_hash's
    assert index.text_hashes.tolist() == [text_hash(r["title"], r["text"]) for r in ROWS]


def _poisoned(facts: dict) -> dict:
    return {**facts, "corpus_hash": "f" * 64, "sha256": "f" * 64}


def test_an_index_written_by_the_previous_version_is_not_read(tmp_path):
    """Version 3 wrote ``<sha256([3, *stamp])>.npz`` without a format: its name is never looked up, so a stale
    one (here poisoned) cannot be taken for the file."""
    path = _corpus(tmp_path)
    real = corpus_index(path, tmp_path / "fresh").corpus_hash
    folder = cache_dir("corpus-index")
    old_key = hashlib.sha256(json.dumps([3, *file_stamp(path)]).encode()).hexdigest()
    facts, arrays = load_npz(next((tmp_path / "fresh").glob("*.npz")))
    old = {k: v for k, v in _poisoned(facts).items() if k not in ("format", "kind")}
    save_npz(folder / f"{old_key}.npz", old, arrays)
    assert corpus_index(path).corpus_hash == real
    assert any(p.name.startswith("eval-") for p in _cached())


@pytest.mark.parametrize("change", ["no format", "older format", "train's kind", "wrong dtype", "lengths differ"])
def test_an_index_at_the_right_name_but_not_of_this_format_is_rebuilt(tmp_path, change):
    path = _corpus(tmp_path)
    real = corpus_index(path).corpus_hash
    (file,) = _cached()
    facts, arrays = load_npz(file)
    facts = _poisoned(facts)
    if change == "no format":
        del facts["format"]
    elif change == "older format":
        facts["format"] = INDEX_FORMAT - 1
    elif change == "train's kind":
        facts["kind"] = "train"
    elif change == "wrong dtype":
        arrays["offsets"] = arrays["offsets"].astype(np.uint32)
    else:
        arrays["text_hashes"] = arrays["text_hashes"][:-1]
    save_npz(file, facts, arrays)
    assert corpus_index(path).corpus_hash == real
    # the poisoned facts are read back when nothing else is wrong: the check above is what refused them
    facts, arrays = load_npz(file)
    save_npz(file, _poisoned(facts), arrays)
    assert corpus_index(path).corpus_hash == "f" * 64


def test_a_train_index_of_another_format_is_rebuilt(tmp_path):
    path = _corpus(tmp_path)
    real = load_corpus(path.parent).sha256
    (file,) = _cached()
    facts, arrays = load_npz(file)
    save_npz(file, {**facts, "sha256": "f" * 64, "format": INDEX_FORMAT - 1}, arrays)
    assert load_corpus(path.parent).sha256 == real
    facts, arrays = load_npz(file)
    save_npz(file, {**facts, "sha256": "f" * 64}, arrays)
    assert load_corpus(path.parent).sha256 == "f" * 64  # read from the cache when it is of this format


def test_the_first_repeat_in_reading_order_is_named_by_both_readers(tmp_path):
    rows = [{"_id": i, "text": f"doc {i}"} for i in ("a", "b", "c", "d", "b", "a")]  # b repeats before a does
    path = _corpus(tmp_path, rows)
    eval_text, train_text = _eval_error(path), _train_error(path)
    assert eval_text == train_text and "line 5: duplicate document id 'b' (first at line 2)." in eval_text
