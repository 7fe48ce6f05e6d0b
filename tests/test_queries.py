"""reforge queries: the draw, cropping, every filter, the LM generator (a real SmolLM2 run, a tiny model for resume
and cache), the BEIR folder eval and tune accept, and no read of any qrels file of the source."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import build_model, run, save, save_tokenizer
from reforge.data.beir import load_beir
from reforge.data.lazy import Document
from reforge.errors import DataError, OutputExistsError
from reforge.io.checkpoint import content_key, fingerprint
from reforge.queries.build import make_queries
from reforge.queries.crop import crop_query
from reforge.queries.filters import Candidate, FilterSettings, apply_filters, copied_span, count_reasons
from reforge.queries.generate import GenerationSettings, Generator, QueryLog, clean, generate
from reforge.queries.prompt import Prompt, read_examples
from reforge.queries.sample import sample_documents

SMOL = Path(os.environ.get("REFORGE_MODELS", Path.home() / ".cache" / "reforge-models")) / "SmolLM2-135M-Instruct"
SHORT = Prompt(instruction="w1 w2", examples=(("w5 w6 w7", "w6"), ("w8 w9 w10", "w9")), max_doc_words=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_corpus(folder: Path, docs: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs)
    )
    return folder


def word_docs(count: int, length: int = 12) -> list[tuple[str, str]]:
    return [(f"d{i}", " ".join(f"w{(i * 7 + j) % 100 + 10}" for j in range(length))) for i in range(count)]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer Llama CausalLM with a word-level tokenizer (no chat template: InPars' plain prompt)."""
    folder = save(build_model("llama-causal"), tmp_path_factory.mktemp("lm") / "lm")
    save_tokenizer(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# the draw and the crop


def test_the_draw_takes_one_long_enough_document_from_each_stratum_and_is_seeded():
    docs = [Document(f"d{i}", "", "x " * (25 if i % 4 == 0 else 3)) for i in range(100)]
    sample = sample_documents(docs, 10, seed=0, min_words=20)
    positions = [int(d.id[1:]) for d in sample.documents]
    assert [p // 10 for p in positions] == list(range(10))  # one per tenth of the corpus, in order
    assert all(p % 4 == 0 for p in positions) and sample.empty_strata == 0 and sample.too_short > 0
    assert sample_documents(docs, 10, seed=0, min_words=20) == sample
    assert sample_documents(docs, 10, seed=1, min_words=20).documents != sample.documents
    few = sample_documents(docs, 50, seed=0, min_words=20)  # strata of 2: half hold no long document
    assert len(few.documents) == 25 and few.empty_strata == 25


def test_a_crop_is_a_span_of_10_to_50_percent_of_the_document_capped_and_seeded():
    doc = Document("a", "Title", " ".join(f"t{i}" for i in range(60)))
    for seed in range(20):
        words = crop_query(doc, seed=seed, max_words=100).split()
        assert 6 <= len(words) <= 30 and " ".join(words) in doc.text
        start = int(words[0][1:])
        assert words == [f"t{i}" for i in range(start, start + len(words))]
    assert crop_query(doc, seed=3, max_words=100) == crop_query(doc, seed=3, max_words=100)
    assert len({crop_query(doc, seed=s, max_words=100) for s in range(20)}) > 10
    assert len(crop_query(doc, seed=3, max_words=4).split()) == 4
    assert crop_query(Document("b", "only a title", ""), seed=0, max_words=8) in "only a title"


# ---------------------------------------------------------------------------------------------------------------------
# the filters


def test_every_filter_drops_what_it_names_and_keeps_the_rest():
    doc = Document("a", "Aspirin", "Aspirin lowers the risk of a second heart attack in patients with angina.")
    docs = {"a": doc}
    candidates = [
        Candidate("a", "does aspirin prevent heart attacks"),  # kept
        Candidate("a", "  "),  # empty
        Candidate("a", "?!"),  # empty: no word
        Candidate("a", " ".join(["why"] * 33)),  # too long (32 words at most)
        Candidate("a", "aspirin lowers the risk of a second heart attack"),  # copies 9 words
        Candidate("a", "Does aspirin prevent heart-attacks?"),  # the same words as the first
        Candidate("a", "risk of a second heart attack"),  # copies 6 words: under 8, kept
    ]
    kept, dropped = apply_filters(candidates, docs, FilterSettings(max_words=32, max_copy=8), copy_check=True)
    assert [c.text for c in kept] == ["does aspirin prevent heart attacks", "risk of a second heart attack"]
    assert [r for _, r in dropped] == ["empty", "empty", "too_long", "copied", "duplicate"]
    assert count_reasons(dropped) == {"empty": 2, "too_long": 1, "copied": 1, "duplicate": 1, "bm25": 0}
    # a crop is a span by design: no copy check; max_copy 0 turns it off
    for settings, check in ((FilterSettings(), False), (FilterSettings(max_copy=0), True)):
        kept, _ = apply_filters(candidates[4:5], docs, settings, copy_check=check)
        assert len(kept) == 1
    assert copied_span("a b c d", "x a b c y b c d") == 3 and copied_span("", "a") == 0


def test_clean_takes_the_first_line_without_labels_or_quotes():
    assert clean("\n  Query: 'what is x'\nDocument: y") == "what is x"
    assert clean('"how do bees fly"') == "how do bees fly" and clean("") == ""


def test_examples_file_replaces_the_built_in_ones_and_bad_files_are_refused(tmp_path):
    good = tmp_path / "ex.jsonl"
    good.write_text('{"document": "d one", "query": "q one"}\n{"document": "d two", "query": "q two"}\n')
    assert read_examples(good) == (("d one", "q one"), ("d two", "q two"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"document": "d one"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: an example needs"):
        read_examples(bad)
    assert Prompt(examples=read_examples(good)).digest != Prompt().digest
    assert Prompt(examples=read_examples(good), source="x").digest == Prompt(examples=read_examples(good)).digest


# ---------------------------------------------------------------------------------------------------------------------
# the LM generator


@pytest.mark.skipif(not SMOL.is_dir(), reason="needs SmolLM2-135M-Instruct (../shared/scripts/fetch-models.sh)")
def test_smollm2_writes_the_same_queries_twice_under_one_seed_through_its_chat_template(tmp_path):
    docs = [
        Document("a", "Vitamin D", "Vitamin D deficiency is linked to weaker bones and a higher risk of fractures."),
        Document("b", "", "Regular exercise lowers blood pressure in adults with hypertension, a trial found."),
    ]
    settings = GenerationSettings(batch_size=2, max_new_tokens=16)
    prompt = Prompt(max_doc_words=40)
    model = Generator(SMOL, settings)
    assert model.chat and "<|im_start|>assistant" in model.render(prompt, docs[0])
    assert "why was the rosetta stone important" in model.render(prompt, docs[0])  # the examples are turns
    first, fresh = generate(model, prompt, docs, seed=0, log=QueryLog(tmp_path / "one.jsonl"))
    second, _ = generate(model, prompt, docs, seed=0, log=QueryLog(tmp_path / "two.jsonl"))
    assert fresh == 2 and first == second and all(2 <= len(q.split()) <= 20 for q in first.values())
    assert "vitamin d" in first["a"].lower() or "bone" in first["a"].lower(), first


def test_a_killed_generation_resumes_from_its_log_and_ends_as_an_uninterrupted_run(tiny_lm, tmp_path):
    docs = [Document(d, "", t) for d, t in word_docs(7)]
    settings = GenerationSettings(batch_size=2, max_new_tokens=5)
    whole, _ = generate(Generator(tiny_lm, settings), SHORT, docs, seed=0, log=QueryLog(tmp_path / "whole.jsonl"))

    class Killed(Generator):
        calls = 0

        def queries(self, prompt, chunk, seed):
            Killed.calls += 1
            if Killed.calls == 3:
                raise KeyboardInterrupt  # the kill, after two whole batches
            return super().queries(prompt, chunk, seed)

    log = QueryLog(tmp_path / "resumed.jsonl")
    with pytest.raises(KeyboardInterrupt):
        generate(Killed(tiny_lm, settings), SHORT, docs, seed=0, log=log)
    assert len(log.read()) == 4
    with log.path.open("ab") as handle:
        handle.write(b'{"doc": "torn')  # a kill in the middle of a write
    resumed, fresh = generate(Generator(tiny_lm, settings), SHORT, docs, seed=0, log=log)
    assert fresh == 3 and resumed == whole
    assert len(log.path.read_text().splitlines()) == 7 and len(log.read()) == 7


def test_the_cache_reuses_unchanged_documents_and_regenerates_an_edited_one(tiny_lm, tmp_path):
    data = write_corpus(tmp_path / "data", word_docs(12))
    options = dict(generator=str(tiny_lm), n=6, min_words=5, prompt=SHORT, filters=FilterSettings(max_copy=0))
    options["generation"] = GenerationSettings(batch_size=4, max_new_tokens=4)
    first = make_queries(data, tmp_path / "one", **options)
    assert first.record["counts"]["generated_now"] == 6 and first.record["counts"]["from_cache"] == 0
    from reforge.queries import generate as generate_module

    loaded = []
    real_model = generate_module.Generator.model
    generate_module.Generator.model = property(lambda self: loaded.append(1) or real_model.fget(self))
    try:
        again = make_queries(data, tmp_path / "two", **options)
    finally:
        generate_module.Generator.model = real_model
    assert again.record["counts"]["generated_now"] == 0 and again.queries == first.queries
    assert not loaded  # every query came from the log: no weights were loaded
    edited = word_docs(12)
    source = json.loads((first.output / "queries.jsonl").read_text().splitlines()[0])["source"]
    edited[int(source[1:])] = (source, "w90 w91 w92 w93 w94 w95 w96")
    write_corpus(data, edited)
    third = make_queries(data, tmp_path / "three", **options)
    assert third.record["counts"]["generated_now"] == 1 and third.record["counts"]["from_cache"] == 5
    assert third.record["corpus"]["sha256"] != first.record["corpus"]["sha256"]
    assert make_queries(data, tmp_path / "four", **{**options, "seed": 1}).record["sample"]["drawn"] == 6


def test_generators_differing_only_between_the_fingerprint_samples_share_no_queries(tiny_lm, tmp_path):
    """The log is keyed by the generator's content key: a copy with one weight changed where the sampled
    `fingerprint` reads nothing (16 reads of 4 KB per file) writes its own queries, it does not reuse the original's."""
    edited = tmp_path / "edited"
    shutil.copytree(tiny_lm, edited)
    weights = edited / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    sampled = [(at, at + 4096) for at in range(0, len(raw), max(len(raw) // 16, 1))]
    at = next(o for o in range(data_start, len(raw), 4) if not any(a <= o < b for a, b in sampled))
    raw[at] ^= 1  # the lowest mantissa bit of one float32 weight, between two samples
    weights.write_bytes(bytes(raw))
    assert fingerprint(edited) == fingerprint(tiny_lm) and content_key(edited) != content_key(tiny_lm)
    data = write_corpus(tmp_path / "data", word_docs(10))
    options = dict(n=5, min_words=5, prompt=SHORT, filters=FilterSettings(max_copy=0))
    options["generation"] = GenerationSettings(batch_size=4, max_new_tokens=3)
    original = make_queries(data, tmp_path / "original", generator=str(tiny_lm), **options)
    copy = make_queries(data, tmp_path / "copy", generator=str(edited), **options)
    assert copy.record["counts"]["generated_now"] == 5 and copy.record["counts"]["from_cache"] == 0
    assert original.record["generator"]["content_key"] == content_key(tiny_lm)
    assert copy.record["generator"]["log"] != original.record["generator"]["log"]
    again = make_queries(data, tmp_path / "again", generator=str(edited), **options)
    assert again.record["counts"]["from_cache"] == 5 and again.queries == copy.queries


# ---------------------------------------------------------------------------------------------------------------------
# the folder


def test_the_folder_links_the_corpus_records_how_it_was_made_and_loads_as_beir(tmp_path):
    data = write_corpus(tmp_path / "data", word_docs(30) + [("short", "w1 w2")])
    result = run(
        "queries",
        data,
        "-o",
        tmp_path / "syn",
        "--generator",
        "crop",
        "-n",
        10,
        "--min-words",
        5,
        "--seed",
        3,
        "--json",
    )
    summary = json.loads(result.stdout)
    out = tmp_path / "syn"
    assert (out / "corpus.jsonl").is_symlink() and (out / "corpus.jsonl").resolve() == data / "corpus.jsonl"
    assert summary["corpus"]["mode"] == "link" and summary["generator"]["name"] == "crop"
    assert summary["seed"] == 3 and summary["counts"]["kept"] == 10 and summary["sample"]["drawn"] == 10
    assert json.loads((out / "reforge-queries.json").read_text())["counts"] == summary["counts"]
    dataset = load_beir(out, "synthetic")
    assert len(dataset.queries) == 10 and len(dataset.corpus) == 31 and not dataset.warnings
    rows = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    docs = {d.id: d.text for d in dataset.corpus}
    assert all(dataset.qrels[r["_id"]] == {r["source"]: 1} and r["text"] in docs[r["source"]] for r in rows)
    copied = run(
        "queries",
        data,
        "-o",
        tmp_path / "copy",
        "--generator",
        "crop",
        "-n",
        10,
        "--min-words",
        5,
        "--seed",
        3,
        "--copy-corpus",
    )
    assert not (tmp_path / "copy" / "corpus.jsonl").is_symlink() and "a copy of" in copied.stdout
    assert (tmp_path / "copy" / "queries.jsonl").read_text() == (out / "queries.jsonl").read_text()
    with pytest.raises(OutputExistsError, match="already holds synthetic queries"):
        make_queries(data, out, n=10, min_words=5)
    make_queries(data, out, n=4, min_words=5, overwrite=True)
    assert len(load_beir(out, "synthetic").queries) == 4
    failed = run("queries", data / "nothing", "-o", tmp_path / "x", "--generator", "crop", ok=False)
    assert failed.exit_code == 1 and "data/nothing does not exist" in failed.stderr
    with pytest.raises(DataError, match="No document of .* has 500 words"):
        make_queries(data, tmp_path / "y", min_words=500)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base CausalLM, a bare retriever near it and a DoRA knowledge adapter, as in test_tune, and its dataset
    (16 documents; dev and test qrels that reforge queries must never open)."""
    import copy

    from test_tune import write_dataset

    from conftest import make_adapter, perturbed_bare

    root = tmp_path_factory.mktemp("queries-models")
    base = build_model("llama-causal")
    base_dir = save(copy.deepcopy(base), root / "base")
    save_tokenizer(base_dir)
    retriever = save(perturbed_bare(copy.deepcopy(base)), root / "retriever")
    save_tokenizer(retriever)
    make_adapter(copy.deepcopy(base), root / "psi", dora=True, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    return dict(base=base_dir, retriever=retriever, psi=root / "psi", data=write_dataset(root / "data"))


OPENED: list[str] = []
RECORDING: list[bool] = [False]


def _record_opens(event: str, args: tuple) -> None:
    if RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


def test_eval_and_tune_take_the_folder_and_nothing_opens_a_qrels_file_of_the_source(models, tmp_path):
    if not RECORDING[1:]:
        sys.addaudithook(_record_opens)  # hooks cannot be removed: it records only while RECORDING[0]
        RECORDING.append(True)
    syn = tmp_path / "syn"
    OPENED.clear()
    RECORDING[0] = True
    try:
        run("queries", models["data"], "-o", syn, "--generator", "crop", "-n", 8, "--min-words", 4, "-q")
        evaluated = json.loads(run("eval", models["retriever"], "-d", syn, "--split", "synthetic", "--json").stdout)
        tuned = json.loads(
            run(
                "tune",
                "--base",
                models["base"],
                "--retriever",
                models["retriever"],
                "--adapter",
                models["psi"],
                "-d",
                syn,
                "--split",
                "synthetic",
                "--alpha",
                "0,0.5,1,2",
                "--no-plot",
                "--json",
            ).stdout
        )
    finally:
        RECORDING[0] = False
    qrels = str(models["data"] / "qrels")
    assert any(p.endswith("corpus.jsonl") for p in OPENED) and not [p for p in OPENED if p.startswith(qrels)]
    assert any(p.endswith("qrels/synthetic.tsv") for p in OPENED)
    (result,), (dataset,) = evaluated["results"], evaluated["datasets"]
    assert dataset["split"] == "synthetic" and dataset["queries"] == 8
    assert 0 < result["scores"]["nDCG@10"] <= 1
    assert tuned["split"] == "synthetic" and tuned["dataset"]["queries"] == 8 and not tuned["warnings"]
    assert tuned["points"][0]["score"] == pytest.approx(result["scores"]["nDCG@10"], abs=1e-9)
    decision = tuned["recommendation"]
    assert decision["action"] in ("keep", "noise", "merge") and decision["compared"] == 3
    assert "synthetic queries: they rank the points" in decision["text"]


def test_the_recommendation_says_keep_merge_or_within_noise(models, tmp_path):
    from dataclasses import replace

    from reforge.eval.metrics import PairedTest
    from reforge.tune import recommend, tune

    syn = tmp_path / "syn"
    make_queries(models["data"], syn, n=8, min_words=4)
    report = tune(models["base"], models["psi"], syn, retriever=models["retriever"], split="synthetic", alphas=(0, 1))
    base = report.baseline

    def with_best(score: float, p: float, points: int = 4):
        test = PairedTest("nDCG@10", 40, score - base.score, p, p, 20, 10, 10)
        best = replace(base, alpha=0.5, score=score, test=test)
        others = [replace(best, alpha=a) for a in (0.25, 0.75, 1.0)][: points - 1]
        return replace(report, points=(base, best, *others), best=best, dataset=replace(report.dataset, queries=40))

    keep = recommend(replace(report, points=(base,), best=base))
    assert keep.action == "keep" and keep.alpha == 0 and keep.text.startswith("Keep the retriever (alpha 0): no point")
    merge = recommend(with_best(base.score + 0.05, 0.004))  # 0.004 * 4 points = 0.016 < 0.05
    assert (merge.action, merge.alpha, merge.p_adjusted) == ("merge", 0.5, pytest.approx(0.016))
    assert merge.text.startswith("Merge at alpha 0.5: nDCG@10 +0.0500 on 40 synthetic queries (20/10/10")
    noise = recommend(with_best(base.score + 0.05, 0.02))  # 0.02 * 4 = 0.08: within noise
    assert (noise.action, noise.alpha, noise.gain) == ("noise", 0.0, pytest.approx(0.05))
    assert "within noise" in noise.text and "0.0800 after Bonferroni over the 4 points" in noise.text
    assert recommend(with_best(base.score + 0.05, 0.02, points=2)).action == "merge"  # one point compared: 0.02


def test_the_bm25_filter_keeps_a_query_only_when_bm25_ranks_its_document_in_the_top_k(tmp_path):
    pytest.importorskip("bm25s")
    from reforge.queries.bm25 import bm25_filter

    corpus = [
        Document("cats", "Cats", "Cats purr when they are content and sleep most of the day."),
        Document("dogs", "Dogs", "Dogs bark at strangers and need a walk every day."),
        Document("bees", "Bees", "Bees make honey from nectar and dance to show where flowers are."),
        Document("rain", "Rain", "Rain forms when water vapour condenses around dust in clouds."),
    ]
    kept, dropped, settings = bm25_filter(
        [Candidate("cats", "why do cats purr"), Candidate("rain", "why do dogs bark"), Candidate("bees", "honey")],
        corpus,
        1,
    )
    assert [c.doc_id for c in kept] == ["cats", "bees"] and [(c.doc_id, r) for c, r in dropped] == [("rain", "bm25")]
    assert settings["top"] == 1 and settings["library"] == "bm25s"
    data = write_corpus(tmp_path / "data", [(d.id, d.text) for d in corpus])
    summary = json.loads(
        run(
            "queries",
            data,
            "-o",
            tmp_path / "syn",
            "--generator",
            "crop",
            "-n",
            4,
            "--min-words",
            5,
            "--bm25-top",
            4,
            "--json",
        ).stdout
    )
    assert summary["filters"]["bm25"]["top"] == 4 and summary["counts"]["kept"] == 4  # every doc is in the top 4


def test_without_a_system_turn_the_instruction_opens_the_first_user_turn():
    doc = Document("a", "T", "some text")
    with_system, without = Prompt().messages(doc), Prompt().messages(doc, system=False)
    assert [m["role"] for m in with_system] == ["system"] + ["user", "assistant"] * 4 + ["user"]
    assert [m["role"] for m in without] == ["user", "assistant"] * 4 + ["user"]
    assert without[0]["content"].startswith(Prompt().instruction + "\n\nDocument: The Rosetta Stone")
    assert without[1:] == with_system[2:] and without[-1]["content"] == "Document: T. some text"
