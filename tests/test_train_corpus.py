"""reforge.data.corpus: every input kind, the id filters, and the errors for bad input, on real SciFact text."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from test_train import config, llama_base, tokenizer  # noqa: F401  (fixtures)

from conftest import DATA
from reforge.data.beir import iter_corpus
from reforge.data.corpus import DocSelection, detect_kind, load_corpus
from reforge.errors import DataError
from reforge.io.paths import cache_dir

SCIFACT = DATA / "scifact"


def _scifact_rows(n):
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line, _ in zip(handle, range(n))]


def _judged(split):
    with (SCIFACT / "qrels" / f"{split}.tsv").open(encoding="utf-8") as handle:
        return {row["corpus-id"] for row in csv.DictReader(handle, delimiter="\t")}


def test_beir_folder_joins_title_and_text_like_the_retriever():
    corpus = load_corpus(SCIFACT, selection=DocSelection(max_docs=5))
    rows = _scifact_rows(5)
    assert corpus.kinds == ("beir",) and corpus.read == 5183 and corpus.filtered == 5178
    assert [d.id for d in corpus.docs] == [r["_id"] for r in rows]
    assert corpus.docs[0].text == f"{rows[0]['title']} {rows[0]['text']}".strip()
    assert [d.text for d in corpus.docs] == [doc.passage() for doc, _ in zip(iter_corpus(SCIFACT), range(5))]


def test_corpus_jsonl_file_reads_the_same_as_its_folder():
    folder = load_corpus(SCIFACT, selection=DocSelection(max_docs=20))
    file = load_corpus(SCIFACT / "corpus.jsonl", selection=DocSelection(max_docs=20))
    assert file.kinds == ("jsonl",) and file.docs == folder.docs and file.sha256 == folder.sha256


def test_text_field_of_any_jsonl(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"id": 7, "body": "first note"}\n\n{"id": 8, "body": "second note"}\n', encoding="utf-8")
    corpus = load_corpus(path, text_field="body")
    assert [(d.id, d.text) for d in corpus.docs] == [("7", "first note"), ("8", "second note")]


def test_missing_text_field_names_line_and_fields(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"id": 7, "body": "first"}\n{"id": 8, "content": "second"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_corpus(path, text_field="body")
    assert e.value.line == 2
    assert "notes.jsonl, line 2 has no field 'body' (fields there: id, content)" in str(e.value)
    assert "--text-field" in str(e.value) and "--skip-bad-lines" in str(e.value)
    with pytest.raises(DataError, match=r"line 1 has no field 'text' \(fields there: id, body\)"):
        load_corpus(path)  # plain JSONL without BEIR's text field: must say which field to pass
    assert [d.id for d in load_corpus(path, text_field="body", skip_bad_lines=True).docs] == ["7"]


def test_bad_json_line_is_named_or_skipped(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = _scifact_rows(3)
    lines = [json.dumps(rows[0]), '{"_id": "x", "text": unquoted}', json.dumps(rows[1]), json.dumps(rows[2])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_corpus(tmp_path)
    assert e.value.line == 2 and "corpus.jsonl, line 2: not a valid JSON object" in str(e.value)
    assert "--skip-bad-lines" in str(e.value)
    kept = load_corpus(tmp_path, skip_bad_lines=True)
    assert [d.id for d in kept.docs] == [rows[0]["_id"], rows[1]["_id"], rows[2]["_id"]]


def test_text_files_per_file_and_per_line(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Second file.\nIts second line.\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("  First file.  \n", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("\n\nThird.\n", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text input", encoding="utf-8")
    per_file = load_corpus(tmp_path)
    assert per_file.kinds == ("text",)
    assert [(d.id, d.text) for d in per_file.docs] == [
        ("a.txt", "First file."),
        ("b.txt", "Second file.\nIts second line."),
        ("sub/c.txt", "Third."),
    ]
    per_line = load_corpus(tmp_path, per_line=True)
    assert [(d.id, d.text) for d in per_line.docs] == [
        ("a.txt:1", "First file."),
        ("b.txt:1", "Second file."),
        ("b.txt:2", "Its second line."),
        ("sub/c.txt:3", "Third."),
    ]
    single = load_corpus(tmp_path / "b.txt", per_line=True)
    assert [d.id for d in single.docs] == ["b.txt:1", "b.txt:2"]


def test_several_sources_in_order(tmp_path):
    (tmp_path / "x.txt").write_text("extra text", encoding="utf-8")
    corpus = load_corpus([SCIFACT, tmp_path / "x.txt"], selection=DocSelection(max_docs=3))
    assert corpus.kinds == ("beir", "text") and len(corpus.docs) == 3  # max_docs counts over all sources
    both = load_corpus([tmp_path / "x.txt", SCIFACT], selection=DocSelection(max_docs=2))
    assert both.docs[0].text == "extra text" and both.docs[1].id == _scifact_rows(1)[0]["_id"]


def test_saved_hf_dataset_folder(tmp_path):
    import datasets

    rows = _scifact_rows(4)
    data = datasets.Dataset.from_list([{"_id": r["_id"], "title": r["title"], "text": r["text"]} for r in rows])
    data.save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(tmp_path / "ds")
    assert corpus.kinds == ("datasets",)
    assert corpus.docs == load_corpus(SCIFACT, selection=DocSelection(max_docs=4)).docs
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_corpus(tmp_path / "dd", text_field="title").docs) == 4
    with pytest.raises(DataError, match=r"has no column 'body' \(columns: _id, title, text\)"):
        load_corpus(tmp_path / "ds", text_field="body")


def test_only_and_exclude_ids(tmp_path):
    rows = _scifact_rows(10)
    (tmp_path / "only.txt").write_text(f"# chosen\n{rows[2]['_id']}\n\n{rows[7]['_id']}\nno-such-id\n")
    (tmp_path / "drop.txt").write_text(f"{rows[0]['_id']}\n{rows[1]['_id']}\n")
    selection = DocSelection.from_files(only_ids=tmp_path / "only.txt")
    corpus = load_corpus(SCIFACT, selection=selection)
    assert [d.id for d in corpus.docs] == [rows[2]["_id"], rows[7]["_id"]] and corpus.only_missing == 1
    dropped = load_corpus(SCIFACT, selection=DocSelection.from_files(exclude_ids=tmp_path / "drop.txt", max_docs=3))
    assert [d.id for d in dropped.docs] == [rows[2]["_id"], rows[3]["_id"], rows[4]["_id"]]


def test_judged_filters_select_the_paper_table_2_subsets():
    judged = _judged("test")
    only = load_corpus(SCIFACT, selection=DocSelection.from_files(only_judged=[SCIFACT / "qrels" / "test.tsv"]))
    assert {d.id for d in only.docs} == judged and len(only.docs) == len(judged) > 100
    without = load_corpus(SCIFACT, selection=DocSelection.from_files(exclude_judged=[SCIFACT / "qrels" / "test.tsv"]))
    assert len(without.docs) == 5183 - len(judged) and not judged & {d.id for d in without.docs}
    both = DocSelection.from_files(exclude_judged=[SCIFACT / "qrels" / "test.tsv", SCIFACT / "qrels" / "train.tsv"])
    assert len(load_corpus(SCIFACT, selection=both).docs) == 5183 - len(judged | _judged("train"))
    with pytest.raises(DataError, match=r"is a folder; .* need a qrels file"):
        DocSelection.from_files(only_judged=[SCIFACT])


def test_hash_follows_content_and_selection():
    a = load_corpus(SCIFACT, selection=DocSelection(max_docs=3))
    b = load_corpus(SCIFACT, selection=DocSelection(max_docs=3))
    c = load_corpus(SCIFACT, selection=DocSelection(max_docs=4))
    assert a.sha256 == b.sha256 != c.sha256 and len(a.sha256) == 64


def test_empty_corpus_and_no_usable_text(tmp_path):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.jsonl: no usable text: 0 documents read, 0 empty, 0 removed"):
        load_corpus(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no usable text: 2 documents read, 2 empty, 0 removed by the filters"):
        load_corpus(tmp_path / "blank.jsonl")
    (tmp_path / "none.txt").write_text("nothing\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"1 documents read, 0 empty, 1 removed by the filters"):
        load_corpus(tmp_path / "none.txt", selection=DocSelection(only=frozenset({"other"})))


def test_unreadable_paths(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown corpus file type '.csv'"):
        detect_kind(tmp_path / "data.csv")
    with pytest.raises(DataError, match=r"does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"holds no corpus.jsonl, no .txt files and no saved HF dataset"):
        load_corpus(tmp_path / "folder")


def test_docstring_example_runs(monkeypatch):
    import doctest

    import reforge.data.corpus as module

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the example's ../shared is relative to the repo
    assert doctest.testmod(module).failed == 0


def test_lazy_corpus_is_read_on_demand_and_cached(tmp_path):
    from reforge.data.corpus import CorpusDocs, corpus_texts

    selection = DocSelection(exclude=frozenset({_scifact_rows(1)[0]["_id"]}), max_docs=300)
    held = load_corpus(SCIFACT, selection=selection, lazy=False)
    lazy = load_corpus(SCIFACT, selection=selection)
    assert isinstance(held.docs, list) and isinstance(lazy.docs, CorpusDocs)
    assert list(lazy.docs) == held.docs and lazy.sha256 == held.sha256
    assert (lazy.read, lazy.empty, lazy.filtered) == (held.read, held.empty, held.filtered) == (5183, 0, 4883)
    texts = corpus_texts(lazy)
    assert list(texts[1::3]) == [d.text for d in held.docs[1::3]] and texts[-1] == held.docs[-1].text
    assert lazy.docs.take([5, 2]) == [held.docs[5], held.docs[2]]
    (layout,) = cache_dir("corpus-index").glob("train-*.npz")
    again = load_corpus(SCIFACT, selection=selection)  # from the cached pass: the file is not scanned
    assert list(again.docs) == held.docs and again.sha256 == held.sha256 and again.filtered == held.filtered
    other = load_corpus(SCIFACT, selection=DocSelection(max_docs=300))  # other options: another pass
    assert other.docs[0].id == _scifact_rows(1)[0]["_id"]


def test_training_on_the_lazy_corpus_equals_training_on_the_held_one(llama_base, tmp_path, monkeypatch):  # noqa: F811
    from functools import partial

    from safetensors.torch import load_file

    from reforge.train import dora

    options = dict(max_docs=40, max_steps=3, batching="rows", batch_size=2, seed=3)
    seen: dict = {}
    for name in ("held", "lazy"):
        with monkeypatch.context() as patch:
            if name == "held":  # the behaviour before: every document's text in a list on every rank
                patch.setattr(dora, "load_corpus", partial(dora.load_corpus, lazy=False))
            losses = seen[name] = []
            dora.train_adapter(
                config(llama_base, tmp_path / name, **options),
                progress=lambda s, t, x, into=losses: into.append(x.loss),
            )
            data = dora.setup_data(
                config(llama_base, tmp_path / "x", **options), dora._load_tokenizer(str(llama_base), llama_base)
            )
            seen[f"{name} steps"] = [[data.texts[d] for row in step for d in row] for step in data.plan.epoch_steps(0)]
            seen[f"{name} list"] = isinstance(data.texts, list)
    assert seen["held list"] and not seen["lazy list"]  # the held run kept a list, the lazy one reads on demand
    assert seen["lazy steps"] == seen["held steps"] and len(seen["lazy"]) == 3
    assert seen["lazy"] == seen["held"]  # the same loss at every step, bit for bit
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("held", "lazy"))
    assert all((a[k] == b[k]).all() for k in a)


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def _damaged(data: bytes, damage: str) -> bytes:
    """A cache file as a crash, a full disk or a bad sector leaves it (the flip lands in the first array's bytes)."""
    if damage == "flipped":
        return data[:200] + bytes([data[200] ^ 0xFF]) + data[201:]
    return b"" if damage == "empty" else data[: len(data) // 2]


@pytest.mark.parametrize("damage", ["empty", "cut", "flipped"])
def test_a_damaged_corpus_layout_cache_is_rebuilt(tmp_path, damage):
    path = _jsonl(tmp_path / "c.jsonl", ["alpha one", "beta two", "gamma three"])
    first = load_corpus(path)
    (layout,) = cache_dir("corpus-index").glob("train-*.npz")
    layout.write_bytes(_damaged(layout.read_bytes(), damage))
    again = load_corpus(path)
    assert [d.text for d in again.docs] == ["alpha one", "beta two", "gamma three"] and again.sha256 == first.sha256


def test_a_corpus_replaced_by_one_of_the_same_size_and_time_is_read_again(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", ["alpha one", "beta two"])
    first = load_corpus(path)
    before = path.stat()
    os.replace(_jsonl(tmp_path / "new.jsonl", ["alpha ONE", "beta two"]), path)  # how editors save a file
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as rsync -t or a copy keeping times leaves it
    assert path.stat().st_size == before.st_size
    again = load_corpus(path)
    assert again.docs[0].text == "alpha ONE" and again.sha256 != first.sha256


def test_a_corpus_edited_after_it_was_hashed_is_refused_not_trained_on(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", ["alpha one", "beta two"])
    corpus = load_corpus(path)  # the hash of "beta two" goes into the training record
    path.write_bytes(path.read_bytes().replace(b"beta two", b"beta TWO"))
    assert corpus.docs[0].text == "alpha one"
    with pytest.raises(DataError, match=r"c.jsonl, line 2: document 'd1' changed since the corpus was read"):
        corpus.docs[1]


# ---- one rule for ids, train and eval alike (issue 26) ---------------------------------------------------------------


def _beir_folder(tmp_path, rows):
    folder = tmp_path / "beir"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_a_duplicate_document_id_is_refused_as_eval_refuses_it(tmp_path):
    from reforge.data.lazy import corpus_index

    rows = _scifact_rows(6)
    rows[4] = {**rows[4], "_id": rows[1]["_id"]}  # other text under an id already used
    folder = _beir_folder(tmp_path, rows)
    with pytest.raises(DataError) as train:
        load_corpus(folder)
    assert f"beir/corpus.jsonl, line 5: duplicate document id '{rows[1]['_id']}' (first at line 2)." in str(train.value)
    assert train.value.line == 5 and train.value.doc_id == rows[1]["_id"]
    with pytest.raises(DataError, match="line 5: duplicate document id"):  # eval's reader, the same refusal
        corpus_index(folder / "corpus.jsonl", tmp_path / "cache")
    # a filter that drops the duplicate does not make the file right, and the same holds for any JSONL
    with pytest.raises(DataError, match="duplicate document id"):
        load_corpus(folder, selection=DocSelection(max_docs=2))
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"id": "a", "body": "one"}\n{"id": "b", "body": "two"}\n{"id": "a", "body": "three"}\n')
    with pytest.raises(DataError, match=r"notes.jsonl, line 3: duplicate document id 'a' \(first at line 1\)"):
        load_corpus(notes, text_field="body")


def test_the_same_id_in_two_sources_is_two_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "first file"}\n', encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"body": "second file"}\n', encoding="utf-8")
    corpus = load_corpus([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], text_field="body")
    assert [(d.id, d.text) for d in corpus.docs] == [("1", "first file"), ("1", "second file")]


@pytest.mark.parametrize("value", [None, [1], {"x": 1}, True])
def test_a_null_id_is_an_error_not_the_document_none(tmp_path, value):
    rows = _scifact_rows(3)
    rows[1] = {**rows[1], "_id": value}
    with pytest.raises(DataError, match=r"beir/corpus.jsonl, line 2: '_id' is .*, not a string or a number"):
        load_corpus(_beir_folder(tmp_path, rows))
    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps({"id": value, "body": "text"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes.jsonl, line 1: 'id' is .*, not a string or a number"):
        load_corpus(notes, text_field="body", skip_bad_lines=True)


def test_numeric_ids_stay_ids(tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"_id": 12, "body": "a"}\n{"_id": "13", "body": "b"}\n', encoding="utf-8")
    assert [d.id for d in load_corpus(notes, text_field="body").docs] == ["12", "13"]
