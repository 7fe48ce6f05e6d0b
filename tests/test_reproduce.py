"""examples/reproduce.py: the commands it plans, how it runs and resumes them, and the tables it builds from the
real outputs of the H100 run committed in docs/results/."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from examples.reproduce import parse_args, plan, report, run_steps

REPO = Path(__file__).resolve().parents[1]
GPU_RUN = REPO / "docs" / "results" / "h100-2026-11-26"
CPU_RUN = REPO / "docs" / "results" / "cpu-2026-11-26"  # the NFCorpus rows, run on CPU with a budget
CPU_TABLE2 = REPO / "docs" / "results" / "cpu-table2-2026-11-26"  # Table 2's three variants at one CPU budget
CPU_LASTTOKEN = REPO / "docs" / "results" / "cpu-lasttoken-2026-11-30"  # issue 15 section 4
CPU_SEEDS = REPO / "docs" / "results" / "cpu-seeds-2026-11-30"  # section 6: the same budget over seeds
CPU_BATCHING = REPO / "docs" / "results" / "cpu-batching-1024-2026-11-30"  # section 6: rows vs documents at 1,024


def test_plan_spells_out_budget_encoding_and_honesty(tmp_path):
    args = parse_args(
        [
            "--out",
            str(tmp_path),
            "--train-max-docs",
            "300",
            "--max-queries",
            "50",
            "--corpus-sample",
            "1000",
            "--alphas",
            "0,0.5,1",
        ]
    )
    steps = {s.name: s for s in plan(Path("BASE"), Path("DATA"), tmp_path, args)}
    assert list(steps)[:3] == ["eval-retriever", "psi-scifact", "tune-scifact-test"]
    train = steps["psi-scifact-unjudged"].args
    assert train[:2] == ("train", "BASE") and "--exclude-judged" in train
    assert train[train.index("--max-docs") + 1] == "300" and train[train.index("--max-length") + 1] == "1024"
    assert "--batching" not in train  # the paper's batching unless asked: --train-batching rows
    rows = plan(Path("BASE"), Path("DATA"), tmp_path, parse_args(["--train-batching", "rows"]))
    assert all(s.args[s.args.index("--batching") + 1] == "rows" for s in rows if s.args[0] == "train")
    test, dev = steps["tune-nfcorpus-partial-test"].args, steps["tune-nfcorpus-partial-dev"].args
    assert "--i-know" in test and "--i-know" not in dev  # only the reported split needs the flag
    assert dev[dev.index("--split") + 1] == "dev" and test[test.index("--alpha") + 1] == "0,0.5,1"
    for step in (steps["eval-retriever"], steps["tune-scifact-train"]):  # base and merges encoded the same way
        line = " ".join(step.args)
        assert "--profile repllama --pooling mean --max-length 128" in line and "--dtype float32" in line
    assert "--corpus-sample 1000 --max-queries 50" in " ".join(test)
    assert steps["tune-scifact-train"].needs == ("psi-scifact",)
    only = parse_args(["--only", "psi-scifact", "tune-scifact-test"])
    assert [s.name for s in plan(Path("B"), Path("D"), tmp_path, only)] == ["psi-scifact", "tune-scifact-test"]


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


def test_seeds_plan_puts_the_default_recipe_first_then_rows_then_table2(tmp_path):
    args = parse_args(
        [
            "--out",
            str(tmp_path),
            "--train-max-docs",
            "150",
            "--train-max-length",
            "256",
            "--corpus-sample",
            "1000",
            "--alphas",
            "0,0.5",
            "--seeds",
            "0,1,2",
        ]
    )
    steps = plan(Path("BASE"), Path("DATA"), tmp_path, args)
    names = [s.name for s in steps]
    assert names[:6] == [
        "psi-scifact-seed0",
        "tune-scifact-seed0",
        "size-scifact-seed0",
        "psi-scifact-seed1",
        "tune-scifact-seed1",
        "size-scifact-seed1",
    ]
    assert names[9:11] == ["psi-scifact-rows-seed0", "tune-scifact-rows-seed0"] and len(names) == 36
    by_name = {s.name: s.args for s in steps}
    default, rows = by_name["psi-scifact-seed1"], by_name["psi-scifact-rows-seed1"]
    assert "--batching" not in default and default[default.index("--seed") + 1] == "1"  # the paper's batching
    assert rows[rows.index("--batching") + 1] == "rows" and rows[rows.index("--max-docs") + 1] == "150"
    judged = by_name["psi-scifact-judged-rows-seed2"]
    assert "--only-judged" in judged and judged[judged.index("--seed") + 1] == "2"
    tune = by_name["tune-scifact-seed2"]
    assert tune[tune.index("--adapter") + 1] == str(tmp_path / "psi-scifact-seed2") and "--i-know" in tune
    size = next(s for s in steps if s.name == "size-scifact-judged-rows-seed1")
    assert size.args == ("inspect", str(tmp_path / "psi-scifact-judged-rows-seed1"), "--base", "BASE")
    assert size.needs == ("psi-scifact-judged-rows-seed1",)


def test_seeds_plan_for_the_last_token_retriever_shares_the_adapters(tmp_path):
    budget = ["--out", str(tmp_path), "--train-max-docs", "150", "--corpus-sample", "1000", "--seeds", "0,1,2"]
    mean = plan(Path("BASE"), Path("DATA"), tmp_path, parse_args(budget))
    last = plan(Path("BASE"), Path("DATA"), tmp_path, parse_args([*budget, "--retriever", "last"]))
    trains = [s for s in mean if s.args[0] == "train"]
    assert trains == [s for s in last if s.args[0] == "train"]  # knowledge adapters are trained on the base
    assert [s for s in mean if s.args[0] == "inspect"] == [s for s in last if s.args[0] == "inspect"]  # so sized
    tunes = {s.name: s for s in last if s.args[0] == "tune"}
    assert list(tunes)[:2] == ["tune-last-scifact-seed0", "tune-last-scifact-seed1"] and len(tunes) == 12
    tune = tunes["tune-last-scifact-rows-seed2"]
    assert tune.needs == ("psi-scifact-rows-seed2",)
    assert tune.args[tune.args.index("--adapter") + 1] == str(tmp_path / "psi-scifact-rows-seed2")
    assert tune.args[tune.args.index("--retriever") + 1] == str(REPO / "examples" / "assets" / "repllama-smol-last")
    assert "--profile repllama --pooling last --max-length 128" in " ".join(tune.args)


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
