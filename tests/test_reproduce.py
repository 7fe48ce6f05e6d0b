"""examples/reproduce.py: the recipes it runs with a budget, the layout it keeps their outputs in, and the tables it
builds from the real outputs of the runs committed in docs/results/."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from examples.reproduce import edited_recipe, parse_args, report, run_steps, select, summary_name, write_recipe

REPO = Path(__file__).resolve().parents[1]
GPU_RUN = REPO / "docs" / "results" / "h100-2026-11-26"
CPU_RUN = REPO / "docs" / "results" / "cpu-2026-11-26"  # the NFCorpus rows, run on CPU with a budget
CPU_TABLE2 = REPO / "docs" / "results" / "cpu-table2-2026-11-26"  # Table 2's three variants at one CPU budget
CPU_LASTTOKEN = REPO / "docs" / "results" / "cpu-lasttoken-2026-11-30"  # issue 15 section 4
CPU_SEEDS = REPO / "docs" / "results" / "cpu-seeds-2026-11-30"  # section 6: the same budget over seeds
CPU_BATCHING = REPO / "docs" / "results" / "cpu-batching-1024-2026-11-30"  # section 6: rows vs documents at 1,024


def stand_ins(root: Path) -> tuple[Path, Path]:
    """A base folder and a data folder with scifact/ and nfcorpus-partial/ (tiny BEIR folders; SciFact's held-out
    split is train), enough for the recipes to check and plan."""
    from test_tune import write_dataset

    for name in ("scifact", "nfcorpus-partial"):
        folder = write_dataset(root / "data" / name)
        (folder / "qrels" / "train.tsv").write_text((folder / "qrels" / "dev.tsv").read_text())
    (root / "base").mkdir()
    return root / "base", root / "data"


def planned(args, base: Path) -> list:
    from reforge.recipe.plan import expand
    from reforge.recipe.spec import load_recipe

    return expand(load_recipe(write_recipe(edited_recipe(args, base), args.out)))


def test_the_results_recipe_with_a_budget_spells_out_encoding_and_honesty(tmp_path):
    base, data = stand_ins(tmp_path)
    budget = ["--out", str(tmp_path / "out"), "--data", str(data), "--train-max-docs", "300", "--max-queries", "50"]
    args = parse_args([*budget, "--corpus-sample", "1000", "--alphas", "0,0.5,1"])
    jobs = planned(args, base)
    names = [summary_name(job) for job in jobs]
    assert names[:4] == ["eval-retriever", "eval-retriever", "psi-scifact", "tune-scifact-test"]
    assert len(jobs) == 12 and all(job.output == args.out / name for job, name in zip(jobs, names) if name != names[0])
    by_name = {summary_name(job): job for job in jobs}
    train = by_name["psi-scifact-unjudged"]
    assert train.inputs["base"][0].path == base and train.inputs["corpus"][0].path == data / "scifact"
    assert train.options["exclude_judged"] == [str(data / "scifact" / "qrels" / "test.tsv")]
    assert train.options["max_docs"] == 300 and train.options["max_length"] == 1024  # the paper's length
    assert train.options["batching"] == "documents"  # the paper's batching unless asked: --train-batching rows
    rows = planned(parse_args([*budget, "--train-batching", "rows"]), base)
    assert {job.options["batching"] for job in rows if job.kind == "train"} == {"rows"}
    test, dev = by_name["tune-nfcorpus-partial-test"], by_name["tune-nfcorpus-partial-dev"]
    assert test.options["i_know"] and not dev.options["i_know"]  # only the reported split needs the flag
    assert dev.options["split"] == "dev" and by_name["tune-scifact-train"].options["split"] == "train"
    assert test.options["alphas"] == (0.0, 0.5, 1.0)
    assert test.options["corpus_sample"] == 1000 and test.options["max_queries"] == 50
    for job in (jobs[0], by_name["tune-scifact-train"]):  # the base and the merges encoded the same way
        assert {k: job.options[k] for k in ("profile", "pooling", "max_length", "dtype")} == {
            "profile": "repllama",
            "pooling": "mean",
            "max_length": 128,
            "dtype": "float32",
        }
    assert jobs[0].labels == ["base", "retriever"] and jobs[0].inputs["base"][0].path == base
    assert [need.id for need in by_name["tune-scifact-train"].needs] == ["psi-scifact/scifact"]
    only = select(jobs, ["psi-scifact", "tune-scifact-test"], "mean", seeds=False)
    assert only == ["psi-scifact/scifact", "tune-scifact-test/scifact"] and select(jobs, None, "mean", False) is None
    with pytest.raises(SystemExit, match="psi-scifat"):
        select(jobs, ["psi-scifat"], "mean", seeds=False)


def test_run_steps_saves_json_skips_finished_and_dependents_of_failures(tmp_path):
    from examples.reproduce import Step

    script = tmp_path / "fake.py"  # stands in for `python -m reforge`: echoes JSON, fails on "boom"
    script.write_text(
        "import json, sys\nargs = sys.argv[1:]\nif 'boom' in args: sys.exit(3)\nprint(json.dumps({'args': args}))\n"
    )
    steps = [Step("a", ("train", "x")), Step("b", ("tune", "boom"), needs=("a",)), Step("c", ("tune",), needs=("b",))]
    lines: list[str] = []
    failed = run_steps(steps, tmp_path, [sys.executable, str(script)], log=lines.append)
    assert failed == ["b", "c"]
    assert (tmp_path / "a.json").read_text().strip() == '{"args": ["train", "x", "-q", "--json"]}'
    assert not (tmp_path / "b.json").exists() and not list(tmp_path.glob("*.partial"))
    assert any("skipped: b did not finish" in line for line in lines)
    (tmp_path / "a.json").write_text("{}")  # a rerun keeps what is done
    run_steps(steps[:1], tmp_path, [sys.executable, str(script)], log=lines.append)
    assert (tmp_path / "a.json").read_text() == "{}" and lines[-1] == "   (already done)"


def test_report_from_the_committed_runs_matches_docs_results(tmp_path):
    for path in [*GPU_RUN.glob("*.json"), *CPU_RUN.glob("*.json")]:
        shutil.copy(path, tmp_path)
    text = report(tmp_path)
    docs = (REPO / "docs" / "results.md").read_text()
    assert "| SciFact | 0.1056 | 0.4705 | +0.3649 | <0.001 | <0.001 | 174 / 112 / 14 |" in text
    assert "| SciFact | 0.5 | 0.4848 | +0.0143 | 0.099 | 0.094 | 48 / 213 / 39 |" in text
    assert "| SciFact | train (809 queries) | 0 | 0.5053 | 0.4705 | 0.4848 | 0.4705 |" in text
    assert "| only the test-judged passages | 0.5 | 0.4789 | +0.0084 | 0.077 |" in text
    assert "| NFCorpus-partial | 0.5 | 0.1901 | -0.0013 | 0.783 | 0.790 | 10 / 30 / 10 |" in text
    assert "| NFCorpus-partial | dev (50 queries) | 0.5 | 0.1932 | 0.1901 | 0.1901 | 0.1914 |" in text
    for number in (
        "0.1914",
        "0.1901",
        "0.1906",
        "0.1932",
        "0.1833",
        "0.1056",
        "0.4705",
        "0.4848",
        "0.4710",
        "0.4764",
        "0.4501",
        "0.5053",
        "0.4789",
        "0.4751",
    ):
        assert number in docs, number  # every number quoted in docs/results.md comes from these files


def test_report_of_the_cpu_table2_run_matches_docs_results(tmp_path):
    for path in CPU_TABLE2.glob("*.json"):
        shutil.copy(path, tmp_path)
    text = report(tmp_path)
    assert "| the whole corpus | 0.5 | 0.6794 | +0.0030 | 0.591 |" in text
    assert "| the corpus without the test-judged passages | 0.5 | 0.6804 | +0.0040 | 0.446 |" in text
    assert "| only the test-judged passages | 0.5 | 0.6831 | +0.0067 | 0.207 |" in text
    docs = (REPO / "docs" / "results.md").read_text()
    for number in ("0.6764", "0.6794", "0.6804", "0.6831", "3.455 -> 2.621", "3.501 -> 2.974", "3.196 -> 2.700"):
        assert number in docs and number in text, number


def test_the_seeds_recipe_trains_each_variant_at_each_seed_and_tunes_it_in_both_retrievers(tmp_path):
    base, data = stand_ins(tmp_path)
    out = ["--out", str(tmp_path / "out"), "--data", str(data)]
    jobs = planned(parse_args([*out, "--seeds", "0,1,2"]), base)
    by_name = {summary_name(job): job for job in jobs}
    trains = [job for job in jobs if job.kind == "train"]
    assert [summary_name(job) for job in trains[:3]] == ["psi-scifact-seed0", "psi-scifact-seed1", "psi-scifact-seed2"]
    assert len(trains) == 12 and len(jobs) == 36
    default, rows = by_name["psi-scifact-seed1"].options, by_name["psi-scifact-rows-seed1"].options
    assert default["batching"] == "documents" and default["seed"] == 1  # the paper's batching
    assert rows["batching"] == "rows" and rows["max_docs"] == 150 and rows["max_length"] == 256  # section 6's budget
    judged = by_name["psi-scifact-judged-rows-seed2"].options
    assert judged["only_judged"] == [str(data / "scifact" / "qrels" / "test.tsv")] and judged["seed"] == 2
    tune = by_name["tune-scifact-seed2"]
    assert [need.id for need in tune.needs] == ["psi-scifact/scifact-seed2"] and tune.options["i_know"]
    assert tune.options["alphas"] == (0.0, 0.5) and tune.options["corpus_sample"] == 1000
    last = by_name["tune-last-scifact-rows-seed2"]
    assert [need.id for need in last.needs] == ["psi-scifact-rows/scifact-seed2"]  # the same adapter
    assert last.inputs["retriever"][0].path == REPO / "examples" / "assets" / "repllama-smol-last"
    assert last.options["pooling"] == "last" and tune.options["pooling"] == "mean"

    # --retriever picks the tunes; the adapters (and their sizes) are shared
    mean, lasts = (select(jobs, None, kind, seeds=True) for kind in ("mean", "last"))
    assert [j for j in mean if j.startswith("psi-")] == [j for j in lasts if j.startswith("psi-")]
    assert len(mean) == len(lasts) == 24 and all(j.startswith(("psi-", "tune-last-")) for j in lasts)
    assert not any(j.startswith("tune-last-") for j in mean)
    names = ["psi-scifact-seed0", "tune-last-scifact-seed0", "size-scifact-seed0"]
    assert select(jobs, names, "last", seeds=True) == ["psi-scifact/scifact-seed0", "tune-last-scifact/scifact-seed0"]
    fewer = planned(parse_args([*out, "--seeds", "0,1", "--train-max-length", "1024"]), base)
    assert sorted({job.options["seed"] for job in fewer if job.kind == "train"}) == [0, 1]
    assert {job.options["max_length"] for job in fewer if job.kind == "train"} == {1024}


def test_spread_is_the_sample_std_and_a_one_sample_t_test():
    from examples.reproduce import spread

    s = spread([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0
    assert abs(s["p"] - 0.0742) < 1e-4  # t = 2 / (1 / sqrt 3) = 3.46 on 2 degrees of freedom
    assert spread([0.5]) == {"n": 1, "mean": 0.5, "std": None, "p": None}


def test_report_of_the_cpu_seed_runs_matches_docs_results(tmp_path):
    from examples.reproduce import _batching_table, _retrievers_table, _variance_table, seed_runs

    # seed 0 with --batching rows is the 2026-11-26 Table 2 run itself, copied under its section 6 names
    for old, new in (("", ""), ("-unjudged", "-unjudged"), ("-judged", "-judged")):
        for kind, name in (("psi", f"psi-scifact{old}"), ("tune", f"tune-scifact-test{old}")):
            copied = CPU_SEEDS / f"{kind}-scifact{new}-rows-seed0.json"
            assert copied.read_bytes() == (CPU_TABLE2 / f"{name}.json").read_bytes(), copied.name
    for path in CPU_SEEDS.glob("*.json"):
        shutil.copy(path, tmp_path)
    docs = (REPO / "docs" / "results.md").read_text()
    tables = [_variance_table(tmp_path), _batching_table(tmp_path), _variance_table(tmp_path, "last")]
    tables += [_batching_table(tmp_path, "last"), _retrievers_table(tmp_path)]
    assert all(tables) and "merged into the last-token retriever" in tables[2]
    for line in "\n".join(tables).splitlines():
        assert line in docs, line  # the doc shows exactly what the committed runs give
    runs = {r["seed"]: r for r in seed_runs(tmp_path, "scifact")}
    assert runs[0]["steps"] == 38 and f"{runs[0]['delta']:+.4f}" == "+0.0008"
    last = {r["seed"]: r for r in seed_runs(tmp_path, "scifact", "last")}
    assert set(last) == set(runs) and all(r["budget"] == "150 documents, 256 tokens" for r in last.values())
    for path in (CPU_SEEDS / "retrained").glob("psi-*.json"):
        # the last-token tunes merged adapters trained again today; each trained exactly what the first one did
        again, first = (json.loads(p.read_text())["record"] for p in (path, CPU_SEEDS / path.name))
        assert again["loss"]["history"] == first["loss"]["history"], path.name
        assert (
            again["corpus"]["sha256"] == first["corpus"]["sha256"]
            and again["config"]["seed"] == first["config"]["seed"]
        )


def test_report_of_the_batching_runs_at_1024_tokens_matches_docs_results(tmp_path):
    from examples.reproduce import _batching_table, _retrievers_table, _variance_table, seed_runs

    for path in CPU_BATCHING.glob("*.json"):
        shutil.copy(path, tmp_path)
    docs = (REPO / "docs" / "results.md").read_text()
    tables = [_variance_table(tmp_path, kind) for kind in ("last", "mean")]
    tables += [_batching_table(tmp_path, kind) for kind in ("last", "mean")] + [_retrievers_table(tmp_path)]
    assert all(tables) and "(150 documents, 1024 tokens), merged into the last-token retriever" in tables[0]
    for line in "\n".join(tables).splitlines():
        assert line in docs, line
    paper, rows = (seed_runs(tmp_path, stem, "last") for stem in ("scifact", "scifact-rows"))
    assert [r["seed"] for r in paper] == [r["seed"] for r in rows] == [0, 1, 2]
    assert {r["steps"] for r in paper} == {38} and {r["steps"] for r in rows} == {13}  # 2.9x fewer updates
    assert [r["tokens"] for r in paper] == [r["tokens"] for r in rows]  # the same documents, cut the same way
    # fewer updates, a smaller adapter: every row-packing adapter is smaller than every documents one
    assert max(r["size"] for r in rows) < 0.65 * min(r["size"] for r in paper)


def test_last_token_numbers_in_docs_results_come_from_the_committed_runs():
    docs = (REPO / "docs" / "results.md").read_text()
    evaluation = json.loads((CPU_LASTTOKEN / "eval-lasttoken.json").read_text())
    (comparison,) = evaluation["comparisons"]
    assert evaluation["settings"]["pooling"] == "last" and evaluation["datasets"][0]["sample"]["corpus_sample"] == 1000
    row = (
        f"| run 2 | {comparison['score']:.4f} | {comparison['delta']:+.4f} | <0.001 | <0.001 | "
        f"{comparison['wins']} / {comparison['ties']} / {comparison['losses']} |"
    )
    assert row in docs and f"| untrained base | {comparison['baseline_score']:.4f} |" in docs
    record = json.loads((CPU_LASTTOKEN / "training-lasttoken.json").read_text())
    mrr, loss = record["heldout_in_batch_mrr"], record["training"]["loss"]["mean_per_10_steps"]
    assert (
        f"| {mrr['mrr_before']} before, **{mrr['mrr_after']}** after | {', '.join(f'{x:.3f}' for x in loss)} |" in docs
    )
    assert record["hyperparameters"]["init_adapter"] == "examples/assets/repllama-smol"
    gate = json.loads((CPU_LASTTOKEN / "gate-warmstart-lr1e-4.json").read_text())
    for point in gate["curve"]:
        assert f"{point['mrr_last']} at" in docs and f"{point['loss_mean_last']:.3f}" in docs


def test_the_recipe_run_keeps_each_summary_where_the_tables_read_it(tmp_path):
    """sections 1-3 of the results recipe on tiny models (the SmolLM2 retriever swapped for a tiny one): each job's
    summary lands as <out>/<name>.json in the shape the committed runs have, the tables render from them, and a
    second run runs nothing and rewrites no summary."""
    import copy

    from conftest import build_model, perturbed_bare, save, save_tokenizer
    from examples.reproduce import _retriever_table, _training_table, run_and_collect

    _, data = stand_ins(tmp_path)
    base = build_model("llama-causal", bos_token_id=2, eos_token_id=3, pad_token_id=0)
    save(copy.deepcopy(base), tmp_path / "tiny")
    save_tokenizer(tmp_path / "tiny")
    save(perturbed_bare(copy.deepcopy(base)), tmp_path / "retriever")
    save_tokenizer(tmp_path / "retriever")
    out = tmp_path / "out"
    budget = ["--train-max-docs", "4", "--train-max-length", "16", "--alphas", "0,0.5"]
    args = parse_args(["--out", str(out), "--data", str(data), *budget])
    args.only = ["eval-retriever", "psi-scifact", "tune-scifact-test"]
    recipe = edited_recipe(args, tmp_path / "tiny")
    recipe["retriever"] = str(tmp_path / "retriever")
    assert run_and_collect(recipe, args, tmp_path / "tiny") == []

    kept = sorted(p.name for p in out.glob("*.json") if not p.name.startswith("table"))
    assert kept == ["eval-retriever.json", "psi-scifact.json", "tune-scifact-test.json"]
    trained = json.loads((out / "psi-scifact.json").read_text())
    committed = json.loads((GPU_RUN / "psi-scifact.json").read_text())
    assert set(trained) == set(committed) and trained["documents"] == 4 and trained["steps"] == 1
    assert trained["record"] == json.loads((out / "psi-scifact" / "training_record.json").read_text())
    assert (out / "tune-scifact-test.json").read_bytes() == (out / "tune-scifact-test" / "tune.json").read_bytes()
    evaluated = json.loads((out / "eval-retriever.json").read_text())
    assert set(evaluated) == set(json.loads((GPU_RUN / "eval-retriever.json").read_text()))
    assert [c["dataset"] for c in evaluated["comparisons"]] == ["scifact", "nfcorpus-partial"]
    text = report(out)
    assert "| SciFact | " in _retriever_table(out) and "| NFCorpus-partial | " in _retriever_table(out)
    assert "| psi-scifact | SciFact | 4 | " in _training_table(out) and "| SciFact | 0.5 | " in text

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert run_and_collect(recipe, args, tmp_path / "tiny") == []
    assert {p: p.stat().st_mtime_ns for p in before} == before
