"""The demo's dataset: every judged test document plus a fixed sample, the real SciFact queries and qrels."""

from __future__ import annotations

import json

import pytest

from conftest import DATA
from examples.demo import demo_dataset


@pytest.mark.skipif(not (DATA / "scifact").is_dir(), reason="needs ../shared/data/scifact")
def test_demo_dataset_keeps_every_judged_document(tmp_path):
    folder = demo_dataset(DATA / "scifact", tmp_path / "data", 400)
    ids = [json.loads(line)["_id"] for line in (folder / "corpus.jsonl").read_text().splitlines()]
    judged = {line.split("\t")[1] for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    assert len(ids) == 400 == len(set(ids)) and judged <= set(ids)
    again = demo_dataset(DATA / "scifact", tmp_path / "again", 400)
    assert (again / "corpus.jsonl").read_bytes() == (folder / "corpus.jsonl").read_bytes()  # seeded
    assert not list(tmp_path.glob("*.partial"))
