"""reforge tune: the chosen point is the table's best, in-memory merges equal on-disk merges, --write equals
`reforge merge`, the test split is guarded, repeated points come from the cache, and bad input is refused."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model, make_adapter, perturbed_bare, run, save, save_tokenizer
from reforge.errors import InvalidOptionError
from reforge.tune import (
    InMemoryMerge,
    TunePoint,
    _best,
    parse_grid,
    select_subset,
    tune,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def write_dataset(folder: Path) -> Path:
    """16 documents of tokenizer words, 6 dev queries and 4 test queries (q5 judged in both splits)."""
    rng = random.Random(3)
    docs = [(f"d{i}", "", " ".join(f"w{rng.randrange(4, 60)}" for _ in range(8))) for i in range(16)]
    queries = [(f"q{i}", " ".join(f"w{rng.randrange(4, 60)}" for _ in range(4))) for i in range(10)]
    folder.mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in docs)
    )
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in queries))
    (folder / "qrels").mkdir()
    dev = [(f"q{i}", f"d{(2 * i) % 16}", 1) for i in range(6)] + [("q0", "d7", 2), ("q3", "d9", 1)]
    test = [(f"q{i}", f"d{(3 * i) % 16}", 1) for i in range(5, 10)]
    for split, rows in (("dev", dev), ("test", test)):
        (folder / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows)
        )
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """bf16 base CausalLM, a bf16 bare retriever (sharded), a LoRA retriever over the base, a DoRA knowledge
    adapter, a delta folder, and the BEIR fixture."""
    root = tmp_path_factory.mktemp("tune")
    base = build_model("llama-causal")
    base_dir = save(copy.deepcopy(base), root / "base", dtype=torch.bfloat16)
    save_tokenizer(base_dir)
    retriever_dir = save(
        perturbed_bare(copy.deepcopy(base)), root / "retriever", dtype=torch.bfloat16, shard_size="30KB"
    )
    save_tokenizer(retriever_dir)
    base_bf16 = copy.deepcopy(base).to(torch.bfloat16).float()
    make_adapter(base_bf16, root / "psi", dora=True, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    make_adapter(base_bf16.model, root / "lora-retriever", seed=11, targets=("q_proj", "k_proj", "o_proj"))
    run("diff", base_dir, retriever_dir, "-o", root / "delta", "-q")
    return dict(
        root=root,
        base=base_dir,
        retriever=retriever_dir,
        psi=root / "psi",
        lora_retriever=root / "lora-retriever",
        delta=root / "delta",
        data=write_dataset(root / "data"),
    )


def tune_args(setup, *extra):
    return [
        "tune",
        "--base",
        setup["base"],
        "--retriever",
        setup["retriever"],
        "--adapter",
        setup["psi"],
        "-d",
        setup["data"],
        "--alpha",
        "0,0.5,1,2",
        *extra,
    ]


def test_cli_chooses_the_best_point_records_the_split_plots_and_writes_what_merge_writes(setup, tmp_path):
    plot, out = tmp_path / "curve.png", tmp_path / "best"
    summary = json.loads(run(*tune_args(setup, "--json", "--plot", plot, "--write", out)).stdout)
    assert summary["split"] == "dev" and summary["test_split"] == "test" and not summary["tuned_on_test_split"]
    points = summary["points"]
    assert [(p["alpha"], p["beta"]) for p in points] == [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (2.0, 1.0)]
    scores = [p["score"] for p in points]
    assert len(set(scores)) > 1, "the fixture should make alpha matter"
    best = max(points, key=lambda p: (p["score"], -p["alpha"]))
    assert (summary["best"]["alpha"], summary["best"]["score"]) == (best["alpha"], best["score"])
    assert summary["best"]["baseline_score"] == points[0]["score"] and points[0]["test"] is None
    test = summary["best"]["test_against_baseline"]
    if best["alpha"] != 0:
        assert test["delta"] == pytest.approx(best["score"] - points[0]["score"], abs=1e-12)
        assert 0 < test["p_randomization"] <= 1 and test["n"] == 6
    assert summary["sample"]["queries"] == 6 and summary["dataset"]["split"] == "dev"
    assert summary["in_memory_merges"] == 4 and all(p["merged"] for p in points)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary["plot"] == str(plot)
    assert any("q5" in w and "qrels/test.tsv" in w for w in summary["warnings"])  # q5 is judged in both splits

    reference = tmp_path / "merged"  # --write is exactly `reforge merge` with the chosen alpha
    run(
        "merge",
        "--base",
        setup["base"],
        "--retriever",
        setup["retriever"],
        "--adapter",
        setup["psi"],
        "--alpha",
        best["alpha"],
        "-o",
        reference,
        "-q",
    )
    got, expected = tensors(out), tensors(reference)
    assert set(got) == set(expected) and len(got) == 20 and summary["written"]["tensors"] == 20
    assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in expected)
    assert (out / "config.json").read_bytes() == (reference / "config.json").read_bytes()

    table = run(*tune_args(setup, "--no-plot")).stdout  # every point now comes from the cache
    rows = [line for line in table.splitlines() if line.count("│") > 5 and "alpha" not in line]
    assert len(rows) == 4 and all(line.rstrip().endswith("cached │") for line in rows)
    starred = [line for line in rows if " *" in line]
    assert len(starred) == 1 and f"{best['score']:.4f} *" in starred[0]
    assert starred[0].split("│")[1].strip() == f"{best['alpha']:g}"
    assert f"Best: alpha {best['alpha']:g}, beta 1" in table
    decision = summary["recommendation"]  # what to do, in words, in the table and the JSON
    assert decision["action"] in ("keep", "noise", "merge") and decision["compared"] == 3
    assert f"Recommendation: {decision['text'][:60]}" in " ".join(table.split())


@pytest.mark.parametrize("kind", ["retriever", "lora_retriever", "delta"])
def test_in_memory_merge_equals_on_disk_merge_through_a_sequence_of_points(setup, tmp_path, kind):
    from transformers import AutoModel

    from reforge.eval import EvalSettings
    from reforge.ops.merge import merge
    from reforge.ops.merge_inputs import open_inputs
    from reforge.tune import _merger_and_template

    inputs = {"retriever": None, "delta": None, kind.replace("lora_", ""): setup[kind]}
    source = open_inputs(setup["base"], inputs["retriever"], inputs["delta"], [(setup["psi"], 0.0)])
    merger, _ = _merger_and_template(source, inputs["retriever"], inputs["delta"], setup["base"], EvalSettings(), None)
    assert isinstance(merger, InMemoryMerge)
    computed = []
    for alpha, beta in [(0.0, 1.0), (0.5, 1.0), (0.75, 0.5), (0.75, 1.0), (0.0, 1.0)]:
        model = merger.materialize(
            alpha, beta, device="cpu", dtype=torch.float32, name="p", profile=None, fingerprint="x"
        ).model
        computed.append(merger.tensors_computed)
        out = tmp_path / f"{alpha}-{beta}"
        merge(setup["base"], out, adapters=[(setup["psi"], alpha)], beta=beta, **inputs)
        on_disk = AutoModel.from_pretrained(out, dtype=torch.float32).state_dict()
        in_memory = model.state_dict()
        assert set(on_disk) == set(in_memory)
        assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk), (alpha, beta)
    steps = [b - a for a, b in zip([0] + computed, computed)]
    adapted = len(source.adapters[0][0].modules)  # 8: q, v, up, down in 2 layers
    if kind == "retriever":  # starts as the retriever itself: (0, 1) needs nothing
        assert steps == [0, adapted, len(source.shapes), len(source.shapes), adapted]
    elif kind == "lora_retriever":  # starts as the base: beta moves the retriever's modules, alpha the adapter's
        assert steps[0] == 6 and steps[1] == adapted
    else:
        assert steps[0] == len(source.shapes)


@pytest.mark.parametrize("kind", ["retriever", "lora_retriever", "delta"])
def test_the_tensors_a_point_recomputes_are_the_ones_the_merge_plan_gives_those_terms(setup, tmp_path, kind):
    """Which tensors beta and alpha change has one home (`MergeInputs.has_delta` and `adapted`): tune recomputes,
    between two points, exactly the tensors whose terms in `reforge merge --dry-run`'s plan hold delta or psi."""
    from reforge.ops.job import WriteOptions
    from reforge.ops.merge import merge
    from reforge.ops.merge_compute import point_keys
    from reforge.ops.merge_inputs import open_inputs

    inputs = {"retriever": None, "delta": None, kind.replace("lora_", ""): setup[kind]}
    source = open_inputs(setup["base"], inputs["retriever"], inputs["delta"], [(setup["psi"], 0.0)])
    dry = WriteOptions(dry_run=True)
    plan = merge(setup["base"], tmp_path / "o", adapters=[(setup["psi"], 0.5)], beta=0.5, write=dry, **inputs).plan
    with_delta = [key for key, terms in plan.items() if "0.5*delta" in terms]
    with_psi = [key for key, terms in plan.items() if "0.5*psi[psi]" in terms]
    assert point_keys(source, (0.5, 1.0), (0.5, 0.5)) == with_delta
    assert point_keys(source, (0.0, 0.5), (0.5, 0.5)) == with_psi == sorted(with_psi, key=list(plan).index)
    assert len(with_psi) == 8 and 0 < len(with_delta) <= len(plan)  # 8: q, v, up, down in 2 layers
    assert point_keys(source, None, (0.5, 0.5)) == list(plan) and point_keys(source, (0.5, 1.0), (0.5, 1.0)) == []
    if kind == "lora_retriever":  # Delta only where the LoRA retriever has modules: q, k, o in 2 layers
        assert len(with_delta) == 6


def test_the_test_split_is_refused_unless_i_know(setup):
    result = run(*tune_args(setup, "--split", "test", "--no-plot"), ok=False)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: Refusing to tune on split 'test': it is the split you report")
    assert "--i-know" in result.stderr
    summary = json.loads(
        run(*tune_args(setup, "--split", "test", "--i-know", "--no-plot", "--json", "--alpha", "0,1")).stdout
    )
    assert summary["split"] == "test" and summary["tuned_on_test_split"] and summary["i_know"]
    assert summary["sample"]["queries"] == 5


def test_a_repeated_run_merges_nothing_and_the_baseline_shares_the_retrievers_cache(setup):
    run("eval", setup["retriever"], "-d", setup["data"], "--split", "dev", "-q")  # fills the retriever's entry
    first = tune(setup["base"], setup["psi"], setup["data"], retriever=setup["retriever"], alphas=(0.25, 0.5))
    assert [(p.alpha, p.in_grid, p.merged) for p in first.points] == [
        (0.0, False, False),
        (0.25, True, True),
        (0.5, True, True),
    ]
    assert first.merges == 2 and first.best.in_grid and first.best.alpha in (0.25, 0.5)
    second = tune(setup["base"], setup["psi"], setup["data"], retriever=setup["retriever"], alphas=(0.5, 0.25))
    assert second.merges == 0 and second.tensors_computed == 0
    assert not any(p.merged for p in second.points) and all(p.corpus_cached for p in second.points)
    assert [p.score for p in first.points] == [p.score for p in second.points]


def test_subset_keeps_every_judged_document_and_is_seeded(setup):
    from reforge.data.beir import load_beir

    full = load_beir(setup["data"], "dev")
    small = select_subset(full, max_queries=3, corpus_sample=5, seed=1)
    judged = {d for docs in small.qrels.values() for d in docs}
    assert len(small.queries) == 3 and judged <= {d.id for d in small.corpus}
    assert len(small.corpus) == max(5, len(judged))
    assert [d.id for d in small.corpus] == [d.id for d in full.corpus if d.id in {x.id for x in small.corpus}]
    again = select_subset(full, max_queries=3, corpus_sample=5, seed=1)
    assert again.queries == small.queries and again.corpus == small.corpus
    assert select_subset(full, max_queries=100, corpus_sample=100) is full


def test_ties_go_to_the_point_nearest_the_original_retriever():
    def point(alpha, beta, score):
        return TunePoint(alpha, beta, "", score, True, True, False, None, {})

    points = [point(1.0, 1.0, 0.5), point(0.5, 1.0, 0.5), point(0.25, 0.9, 0.5), point(0.75, 1.0, 0.4)]
    assert (_best(points).alpha, _best(points).beta) == (0.25, 0.9)
    assert _best(points[:2]).alpha == 0.5
    assert _best([point(0.0, 1.0, 0.3), point(0.5, 1.0, 0.31)]).alpha == 0.5


def test_grid_parsing():
    assert parse_grid("0:1:0.25") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_grid("0, 0.5,2") == (0.0, 0.5, 2.0)
    assert parse_grid("0:0.3:0.1,1") == (0.0, 0.1, 0.2, 0.3, 1.0)
    for text, message in (
        ("a,b", "is not a list of numbers"),
        ("0,0.5,0", "gives 0 twice"),
        ("0:1:0", "must be start:stop:step with a step above 0"),
        ("0:1", "must be start:stop"),
        ("nan", "must be a finite number"),
        (",", "no value"),
    ):
        with pytest.raises(InvalidOptionError, match=message):
            parse_grid(text)


def test_bad_inputs_are_refused_with_a_message(setup, tmp_path):
    base = ["tune", "--base", setup["base"], "--adapter", setup["psi"], "-d", setup["data"], "--no-plot"]
    cases = [
        ([*base, "--retriever", setup["retriever"], "--alpha", "0,x"], 2, "--alpha '0,x' is not a list of numbers"),
        ([*base, "--retriever", setup["retriever"], "--beta", "1,1"], 2, "--beta gives 1 twice"),
        ([*base], 2, "Pass exactly one of --retriever and --delta."),
        ([*base, "--retriever", setup["retriever"], "--delta", setup["delta"]], 2, "Pass exactly one of"),
        ([*base, "--retriever", setup["retriever"], "--plot", tmp_path / "p.png"], 2, "--plot and --no-plot"),
        ([*base, "--retriever", setup["retriever"], "--max-queries", "0"], 2, "0 is not in the range x>=1"),
        ([*base, "--retriever", setup["retriever"], "--metric", "nope@3"], 2, "Unknown metric 'nope@3'"),
        ([*base, "--retriever", setup["retriever"], "--split", "train"], 1, "Split 'train' does not exist in"),
    ]
    not_adapter = [setup["retriever"] if arg == setup["psi"] else arg for arg in base]  # --adapter: the retriever
    not_adapter += ["--retriever", setup["retriever"]]
    cases.append((not_adapter, 1, "retriever is not a peft adapter folder (no adapter_config.json)."))
    for args, code, message in cases:
        result = run(*args, ok=False)
        assert result.exit_code == code, (args, result.output, result.stderr)
        assert message in " ".join(result.stderr.split()), (message, result.stderr)
    with pytest.raises(InvalidOptionError, match="--corpus-sample must be at least 1, got 0"):
        tune(setup["base"], setup["psi"], setup["data"], retriever=setup["retriever"], corpus_sample=0)
    with pytest.raises(InvalidOptionError, match="give exactly one of --retriever"):
        tune(setup["base"], setup["psi"], setup["data"])


def test_delta_and_beta_grid_through_the_cli(setup, tmp_path):
    summary = json.loads(
        run(
            "tune",
            "--base",
            setup["base"],
            "--delta",
            setup["delta"],
            "--adapter",
            setup["psi"],
            "-d",
            setup["data"],
            "--alpha",
            "0,1",
            "--beta",
            "0.5,1",
            "--json",
            "--plot",
            tmp_path / "p.png",
        ).stdout
    )
    assert [(p["alpha"], p["beta"]) for p in summary["points"]] == [(0.0, 0.5), (1.0, 0.5), (0.0, 1.0), (1.0, 1.0)]
    assert summary["inputs"]["delta"]["ref"] == str(setup["delta"]) and summary["inputs"]["retriever"] is None
    assert (tmp_path / "p.png").stat().st_size > 1000
