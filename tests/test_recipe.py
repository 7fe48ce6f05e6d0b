"""reforge run: a tiny recipe end to end (its merge is `reforge merge`'s, its table is eval's), a second run does
nothing, an edit reruns only what it touches, a killed training resumes to the same adapter, and bad recipes fail
before any work with the line that is wrong."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_tune import write_dataset

from conftest import build_model, perturbed_bare, save, save_tokenizer
from conftest import run as run_cli

ROOT = Path(__file__).resolve().parents[1]

# 16 documents cut to 16 tokens; lr 0.05 so that four steps move the tiny model enough to change a ranking
RECIPE = """\
out: out
base: {base}
retriever: {retriever}
corpora:
  tiny: {data}
datasets:
  tiny: {data}
steps:
  psi:
    train:
      max-length: 16
      lora-r: 4
      lora-alpha: 8
      lr: 0.05
      target-modules: [q_proj, v_proj]
      save-every: 1
  readapted:
    merge: {{adapter: psi, alpha: 0.5}}
  eval:
    eval: {{models: [retriever, readapted], pooling: mean, max-length: 16}}
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny causal base LM with a word tokenizer, a bare retriever made from it, and a 16-document BEIR folder."""
    root = tmp_path_factory.mktemp("recipe-inputs")
    base = build_model("llama-causal", bos_token_id=2, eos_token_id=3, pad_token_id=0)
    save(copy.deepcopy(base), root / "base")
    save_tokenizer(root / "base")
    save(perturbed_bare(copy.deepcopy(base)), root / "retriever")
    save_tokenizer(root / "retriever")
    return {"base": root / "base", "retriever": root / "retriever", "data": write_dataset(root / "data")}


def write_recipe(folder: Path, inputs: dict, text: str = RECIPE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(text.format(**inputs))
    return path


def run(*args, ok=True):
    return run_cli("run", *args, ok=ok)


def run_json(recipe: Path) -> dict:
    return json.loads(run(recipe, "--json").stdout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_tiny_recipe_end_to_end_then_a_second_run_does_nothing(inputs, tmp_path):
    recipe = write_recipe(tmp_path / "r", inputs)
    report = run_json(recipe)
    out = tmp_path / "r" / "out"
    assert report["ran"] == ["psi/tiny", "readapted/tiny-alpha0.5", "eval/tiny"] and report["skipped"] == []

    # the merge is exactly what `reforge merge` writes for that adapter and alpha
    merged = out / "readapted" / "tiny-alpha0.5"
    from reforge.ops.merge import merge

    merge(inputs["base"], tmp_path / "by-hand", retriever=inputs["retriever"], adapters=[(out / "psi" / "tiny", 0.5)])
    a, b = load_file(merged / "model.safetensors"), load_file(tmp_path / "by-hand" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    # the table holds eval's own numbers, and the change is the difference of the two scores
    summary = json.loads((out / "eval" / "tiny" / "summary.json").read_text())
    scores = {r["model"]: r["scores"]["nDCG@10"] for r in summary["results"]}
    table = json.loads((out / "table.json").read_text())["tables"][0]
    row = table["rows"][0]
    assert table["baseline"] == "retriever" and table["models"] == ["retriever", "readapted"]
    assert row["scores"] == scores
    change = row["changes"]["readapted"]
    assert change["delta"] == pytest.approx(scores["readapted"] - scores["retriever"])
    assert change["delta"] != 0.0, "the fixture should make the adapter matter"
    assert 0.0 <= change["p_randomization"] <= 1.0
    assert "| tiny | " in (out / "table.md").read_text()
    assert (out / "table.png").stat().st_size > 0 and (out / "recipe.yaml").read_text() == recipe.read_text()

    # every output records the recipe: its hash in the stamp, a copy beside it, and the command in reforge.json
    recipe_hash = hashlib.sha256(recipe.read_bytes()).hexdigest()
    for folder in (out / "psi" / "tiny", merged, out / "eval" / "tiny"):
        stamp = json.loads((folder / "reforge-recipe.json").read_text())
        assert stamp["recipe"]["sha256"] == recipe_hash
        assert (folder / "reforge-recipe.yaml").read_text() == recipe.read_text()
    assert recipe_hash[:16] in json.loads((merged / "reforge.json").read_text())["command"]

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_json(recipe)
    assert again["ran"] == [] and again["skipped"] == report["ran"]
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_editing_alpha_reruns_only_the_merge_and_the_eval_after_it(inputs, tmp_path):
    recipe = write_recipe(tmp_path / "r", inputs)
    run_json(recipe)
    adapter = tmp_path / "r" / "out" / "psi" / "tiny" / "adapter_model.safetensors"
    trained = (sha256(adapter), adapter.stat().st_mtime_ns)
    recipe.write_text(recipe.read_text().replace("alpha: 0.5", "alpha: 1.0"))
    dry = json.loads(run(recipe, "--dry-run", "--json").stdout)
    assert [(j["job"], j["action"]) for j in dry["jobs"]] == [
        ("psi/tiny", "skip"),
        ("readapted/tiny-alpha1", "run"),
        ("eval/tiny", "run"),
    ]
    report = run_json(recipe)
    assert report["ran"] == ["readapted/tiny-alpha1", "eval/tiny"] and report["skipped"] == ["psi/tiny"]
    assert (sha256(adapter), adapter.stat().st_mtime_ns) == trained
    assert json.loads((tmp_path / "r" / "out" / "table.json").read_text())["tables"][0]["models"][1] == "readapted"

    # an eval option touches only the eval
    recipe.write_text(recipe.read_text().replace("pooling: mean, max-length: 16", "pooling: mean, max-length: 12"))
    report = run_json(recipe)
    assert report["ran"] == ["eval/tiny"]

    # changing the corpus's content reruns the training and all after it
    corpus = inputs["data"] / "corpus.jsonl"
    text = corpus.read_text()
    try:
        corpus.write_text(text.replace("w1", "w2", 1) if "w1" in text else text + "\n")
        assert run_json(recipe)["ran"] == ["psi/tiny", "readapted/tiny-alpha1", "eval/tiny"]
    finally:
        corpus.write_text(text)


def test_dry_run_prints_documents_and_tokens_and_writes_nothing(inputs, tmp_path):
    recipe = write_recipe(tmp_path / "r", inputs)
    report = json.loads(run(recipe, "--dry-run", "--json").stdout)
    train = report["jobs"][0]
    assert train["action"] == "run" and train["training"]["documents"] == 16
    assert train["training"]["tokens"] > 0 and train["training"]["steps"] == 4
    assert [j["reason"] for j in report["jobs"][1:]] == ["after psi/tiny", "after readapted/tiny-alpha0.5"]
    assert not (tmp_path / "r" / "out").exists()
    text = run(recipe, "--dry-run").stdout
    assert "psi/tiny" in text and "readapted/tiny-alpha0.5" in text


def test_a_kill_during_training_then_run_again_resumes_to_the_same_adapter(inputs, tmp_path):
    from reforge.train.state import work_dir

    # one document a step: 16 steps, a checkpoint after each; dropout on, so the resume must restore the RNG too
    text = RECIPE.replace("save-every: 1", "save-every: 1\n      batch-size: 1")
    text = text[: text.index("  readapted:")]
    killed, whole = write_recipe(tmp_path / "killed", inputs, text), write_recipe(tmp_path / "whole", inputs, text)
    output = tmp_path / "killed" / "out" / "psi" / "tiny"
    checkpoints = work_dir(output) / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "reforge", "run", str(killed), "-q"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not any(checkpoints.glob("step-*[0-9]")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert not output.exists() and any(checkpoints.glob("step-*[0-9]")), "killed before the end, after a checkpoint"

    dry = json.loads(run(killed, "--dry-run", "--json").stdout)
    assert dry["jobs"][0]["action"] == "resume" and dry["jobs"][0]["reason"] == "stopped before it finished"
    report = run_json(killed)
    assert [(j["job"], j["action"]) for j in report["jobs"]] == [("psi/tiny", "resume")]
    stamp = json.loads((output / "reforge-recipe.json").read_text())
    assert stamp["training"]["resumed_from"] >= 1 and stamp["training"]["steps"] == 16
    run_json(whole)
    # the same adapter: the SHA-256 of every tensor's name, dtype, shape and bytes, and the same metadata. (Not the
    # file's SHA-256: safetensors' `save` writes the metadata keys in hash order, which changes from call to call,
    # so two saves of the same tensors differ in bytes; measured 6 orders in 20 saves, 2026-12-07.)
    resumed, uninterrupted = output, tmp_path / "whole" / "out" / "psi" / "tiny"
    assert tensors_sha256(resumed) == tensors_sha256(uninterrupted)
    assert header_metadata(resumed) == header_metadata(uninterrupted)


def tensors_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(folder / "adapter_model.safetensors").items()):
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def header_metadata(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", framework="pt") as handle:
        return handle.metadata()


BAD = {
    "typo": ("      lora-r: 4\n", "      lora-rr: 4\n", 12, "'lora-rr' is not a key of steps.psi.train", "'lora-r'"),
    "type": ("      lora-r: 4\n", "      lora-r: four\n", 12, "must be a whole number, not text 'four'", None),
    "range": ("      lora-r: 4\n", "      lora-r: 0\n", 12, "step 'psi' (lora-r): Training option r must be", None),
    "unknown step": ("{adapter: psi,", "{adapter: psy,", 18, "adapter 'psy' names no train step", None),
    "missing input": ("  tiny: {data}\n", "  tiny: {data}/nowhere\n", 5, "is missing", None),
    "cycle": ("    train:\n", "    train:\n      base: readapted\n", 9, "cycle: psi -> readapted -> psi", None),
    "overwrite": ("  eval:\n", "  eval:\n    output: {data}\n", 20, "which is", "apart from the inputs"),
    "twice": ("  readapted:\n", "  psi:\n    diff: {{}}\n  readapted:\n", 17, "gives 'psi' twice", None),
    "kind": ("    merge: {{", "    merg: {{", 18, "'merg' is not a key of steps.readapted", "'merge'"),
    "yaml": ("      lora-r: 4\n", "      lora-r: [4\n", 13, "is not valid YAML",
             "while parsing a flow sequence, line 12"),
    "dataset": ("models: [retriever, readapted]", "models: [retriever, readapted], datasets: [tiny, big]", 20,
                "datasets 'big' is not one of the recipe's datasets", None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_recipe_fails_before_any_work_naming_its_line(inputs, tmp_path, case):
    old, new, line, problem, hint = BAD[case]
    assert old in RECIPE
    recipe = write_recipe(tmp_path / "r", inputs, RECIPE.replace(old, new, 1))
    result = run(recipe, ok=False)
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert message.startswith(f"Error: {recipe}:{line}:") or f"recipe.yaml:{line}:" in message, message
    assert problem in message and (hint is None or hint in message), message
    assert not (tmp_path / "r" / "out").exists()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["recipe.yaml"]


def test_recipe_options_are_the_commands_own_with_the_same_defaults():
    """Every option a recipe step takes is an option of the command, spelled the same, with its default."""
    import click

    from reforge.cli import COMMANDS
    from reforge.recipe.spec import SCHEMAS

    for kind in ("diff", "train", "tune", "merge", "eval", "push"):
        module, attribute, _ = COMMANDS[kind]
        command = getattr(__import__(module, fromlist=[attribute]), attribute)
        options = {opt.lstrip("-"): p for p in command.params for opt in p.opts if opt.startswith("--")}
        own = {"eval": {"matched"}, "push": {"repo"}}.get(kind, set())
        for key, option in SCHEMAS[kind]().items():
            if key in own:
                continue
            assert key in options, f"{kind}: {key} is not an option of reforge {kind}"
            param = options[key]
            plain = isinstance(param.default, (int, float, str)) and not isinstance(param.default, bool)
            if isinstance(param, click.Option) and not param.is_flag and not param.multiple and plain:
                default = param.type_cast_value(click.Context(command), param.default)
                expected = option.default
                if isinstance(default, tuple):
                    expected = tuple(expected)
                if isinstance(expected, list):  # a comma-separated list on the command line
                    expected = ",".join(expected)
                assert default == expected or str(default) == str(expected) or default == "auto", (kind, key)


TUNED = (
    RECIPE[: RECIPE.index("  readapted:")]
    + """\
  delta:
    diff: {{}}
  tuned:
    tune: {{adapter: psi, delta: delta, alpha: [0, 0.5, 1, 2], split: dev, pooling: mean, max-length: 16}}
  readapted:
    merge: {{adapter: psi, delta: delta, alpha: tuned}}
  publish:
    push: {{model: readapted, repo: "user/readapted-{{corpus}}"}}
"""
)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from fakehub import fake_hub_fixture

    yield from fake_hub_fixture(tmp_path, monkeypatch)


def test_diff_tune_merge_at_the_tuned_alpha_and_push(inputs, tmp_path, fake_hub):
    from fakehub import WRITE_TOKEN
    from reforge.ops.merge import merge

    recipe = write_recipe(tmp_path / "r", inputs, TUNED)
    report = json.loads(run(recipe, "--json", "--token", WRITE_TOKEN).stdout)
    assert report["ran"] == ["psi/tiny", "delta", "tuned/tiny", "readapted/tiny", "publish/tiny"]
    out = tmp_path / "r" / "out"
    best = json.loads((out / "tuned" / "tiny" / "tune.json").read_text())["best"]["alpha"]
    merged = out / "readapted" / "tiny"
    assert json.loads((merged / "reforge-recipe.json").read_text())["options"]["alpha"] == best
    merge(inputs["base"], tmp_path / "by-hand", delta=out / "delta", adapters=[(out / "psi" / "tiny", best)])
    a, b = load_file(merged / "model.safetensors"), load_file(tmp_path / "by-hand" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    pushed = fake_hub.files("user/readapted-tiny")
    assert pushed["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert pushed["reforge-recipe.yaml"] == recipe.read_bytes()
    commits = len(fake_hub.requests)
    again = json.loads(run(recipe, "--json", "--token", WRITE_TOKEN).stdout)
    assert again["ran"] == [] and len(fake_hub.requests) == commits


RECIPES = ROOT / "recipes"


@pytest.mark.parametrize("name", ["table1-repllama.yaml", "table1-e5-mistral.yaml"])
def test_the_shipped_table1_recipes_expand_to_the_papers_grid(tmp_path, name):
    """With the 14 BEIR folders in place (tiny stand-ins here), each Table 1 recipe checks and plans: one adapter and
    one merge per corpus, 13 datasets on test and MS MARCO on dev, each dataset's name giving e5-mistral's task."""
    from reforge.profiles import e5_task
    from reforge.recipe.plan import expand
    from reforge.recipe.spec import load_recipe

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / name).write_text((RECIPES / name).read_text())
    recipe = load_recipe(tmp_path / "recipes" / name)  # reads and types; the paths are checked by expand
    names = sorted(recipe.datasets)
    assert sorted(recipe.corpora) == names
    for dataset in names:
        write_dataset(tmp_path / "data" / "beir" / dataset)
    jobs = expand(recipe)
    kinds = [job.kind for job in jobs]
    assert len(names) == 14 and kinds.count("train") == 14 and kinds.count("merge") == 14
    evals = [job for job in jobs if job.kind == "eval"]
    assert sorted(job.dims["dataset"] for job in evals) == names
    assert all(job.labels == ["retriever", "readapted"] for job in evals)
    assert {job.options["split"] for job in evals if job.dims["dataset"] == "msmarco"} == {"dev"}
    assert {job.options["split"] for job in evals if job.dims["dataset"] != "msmarco"} == {"test"}
    assert all(e5_task(dataset) for dataset in names)
    train = next(job for job in jobs if job.kind == "train")
    from reforge.train.config import TrainConfig

    paper = TrainConfig(base="", corpus=[""], output="")
    assert {k: train.options[k] for k in ("r", "lora_alpha", "lr", "batch_size", "max_length", "epochs")} == {
        k: getattr(paper, k) for k in ("r", "lora_alpha", "lr", "batch_size", "max_length", "epochs")
    }
    assert all(job.options["alpha"] == 0.5 for job in jobs if job.kind == "merge")


def test_the_miniature_recipe_checks_against_the_shared_data():
    from examples.prepare_base import default_base_dir
    from reforge.recipe.plan import expand
    from reforge.recipe.spec import load_recipe

    if not (default_base_dir() / "config.json").is_file() or not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("needs the converted SmolLM2 base and ../shared/data")
    jobs = expand(load_recipe(RECIPES / "miniature.yaml"))
    assert [job.id for job in jobs] == [
        "delta",
        "psi/scifact",
        "psi/nfcorpus-partial",
        "readapted/scifact-alpha0.5",
        "readapted/nfcorpus-partial-alpha0.5",
        "eval/scifact",
        "eval/nfcorpus-partial",
    ]
    # docs/results.md's recipes (examples/reproduce.py runs them): every job in a folder of its summary's name
    recipe = load_recipe(RECIPES / "results.yaml")
    results = expand(recipe)
    assert (
        len(results) == 12 and results[2].output == recipe.out / "psi-scifact" == ROOT / ".cache/reproduce/psi-scifact"
    )
    seeds = expand(load_recipe(RECIPES / "results-seeds.yaml"))
    assert len(seeds) == 36 and sorted({job.output.name for job in seeds})[:2] == [
        "psi-scifact-judged-rows-seed0",
        "psi-scifact-judged-rows-seed1",
    ]


def test_options_that_do_not_change_the_adapter_do_not_retrain_it(inputs, tmp_path):
    text = RECIPE[: RECIPE.index("  readapted:")]
    recipe = write_recipe(tmp_path / "r", inputs, text)
    run_json(recipe)
    recipe.write_text(recipe.read_text().replace("save-every: 1", "save-every: 2"))
    assert run_json(recipe)["ran"] == []
    recipe.write_text(recipe.read_text().replace("lr: 0.05", "lr: 0.04"))
    assert run_json(recipe)["ran"] == ["psi/tiny"]


def test_an_output_folder_holding_someone_elses_files_is_refused_before_any_work(inputs, tmp_path):
    recipe = write_recipe(tmp_path / "r", inputs)
    foreign = tmp_path / "r" / "out" / "eval" / "tiny"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    result = run(recipe, ok=False)
    assert result.exit_code == 1 and f"{recipe}:19:" in result.stderr
    assert "holds files reforge did not write" in result.stderr
    assert sorted(p.name for p in (tmp_path / "r" / "out").iterdir()) == ["eval"]
    assert (foreign / "notes.txt").read_text() == "mine"


def test_an_output_changed_by_hand_is_made_again(inputs, tmp_path):
    recipe = write_recipe(tmp_path / "r", inputs)
    run_json(recipe)
    config = tmp_path / "r" / "out" / "readapted" / "tiny-alpha0.5" / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    # the merge is made again, whole; it then holds what the eval read, so the eval stays
    report = run_json(recipe)
    assert report["ran"] == ["readapted/tiny-alpha0.5"]
    assert report["jobs"][1]["reason"] == "output changed since it was made"
    assert '"rms_norm_eps": 1e-06' in config.read_text()


# two adapters (seeds 0 and 1), each in a folder of its own name
SEEDS = RECIPE.replace(
    "      save-every: 1\n", "      save-every: 0\n      seed: [0, 1]\n    output: '{{out}}/psi-seed{{seed}}'\n"
)


def test_a_seed_list_trains_one_adapter_per_seed_and_only_runs_what_a_target_needs(inputs, tmp_path):
    recipe = write_recipe(tmp_path / "r", inputs, SEEDS)
    out = tmp_path / "r" / "out"
    dry = json.loads(run(recipe, "--dry-run", "--json").stdout)
    assert [(j["job"], j["output"]) for j in dry["jobs"][:2]] == [
        ("psi/tiny-seed0", str(out / "psi-seed0")),
        ("psi/tiny-seed1", str(out / "psi-seed1")),
    ]
    assert [j["job"] for j in dry["jobs"][2:]] == [
        "readapted/tiny-seed0-alpha0.5",
        "readapted/tiny-seed1-alpha0.5",
        "eval/tiny",
    ]
    from reforge.recipe.plan import expand
    from reforge.recipe.spec import load_recipe

    (evaluation,) = [job for job in expand(load_recipe(recipe)) if job.kind == "eval"]
    assert evaluation.labels == ["retriever", "readapted seed 0", "readapted seed 1"]

    # a target: the job and what it reads, nothing else
    report = json.loads(run(recipe, "--only", "readapted/tiny-seed1-alpha0.5", "--json").stdout)
    assert report["ran"] == ["psi/tiny-seed1", "readapted/tiny-seed1-alpha0.5"] and report["table"] is None
    stamp = json.loads((out / "psi-seed1" / "reforge-recipe.json").read_text())
    assert stamp["options"]["seed"] == 1 and stamp["dims"] == {"corpus": "tiny", "seed": 1}
    assert stamp["training"]["documents"] == 16 and stamp["training"]["final_loss"] > 0
    assert not (out / "psi-seed0").exists()
    again = json.loads(run(recipe, "--only", "psi", "--json").stdout)  # a step: all its jobs
    assert again["ran"] == ["psi/tiny-seed0"] and again["skipped"] == ["psi/tiny-seed1"]
    seed0, seed1 = (load_file(out / f"psi-seed{k}" / "adapter_model.safetensors") for k in (0, 1))
    assert any(not torch.equal(seed0[k], seed1[k]) for k in seed0), "two seeds, two adapters"

    result = run(recipe, "--only", "psy", ok=False)
    assert result.exit_code == 1 and "has no step or job 'psy' (--only)" in result.stderr


def test_anchors_merge_into_steps_and_x_keys_are_not_read(inputs, tmp_path):
    from reforge.recipe.spec import load_recipe

    text = RECIPE.replace("steps:\n", "x-small: &small {{lora-r: 2, lr: 0.01}}\nsteps:\n", 1).replace(
        "    train:\n", "    train:\n      <<: *small\n", 1
    )
    recipe = load_recipe(write_recipe(tmp_path / "r", inputs, text))
    options = recipe.steps["psi"].options
    assert options["r"] == 4 and options["lr"] == 0.05  # the step's own keys win over the merged ones
    assert options["lora_alpha"] == 8 and "x-small" not in recipe.steps
    plain = text.replace("x-small: &small {{lora-r: 2, lr: 0.01}}\n", "").replace("      <<: *small\n", "")
    merged_only = text.replace("      lora-r: 4\n", "")
    assert load_recipe(write_recipe(tmp_path / "m", inputs, merged_only)).steps["psi"].options["r"] == 2
    assert load_recipe(write_recipe(tmp_path / "p", inputs, plain)).steps["psi"].options["r"] == 4
    # an anchor that overrides what it merges, used whole through an alias
    twice = text.replace("x-small: &small {{lora-r: 2, lr: 0.01}}\n", "x-small: &small {{lora-r: 2, lr: 0.01}}\n"
                         "x-smaller: &smaller {{<<: *small, lr: 0.001}}\n")  # fmt: skip
    twice = twice.replace("  readapted:\n", "  psi2:\n    train: *smaller\n  readapted:\n")
    assert load_recipe(write_recipe(tmp_path / "a", inputs, twice)).steps["psi2"].options["lr"] == 0.001
    result = run(write_recipe(tmp_path / "t", inputs, text.replace("lr: 0.05", "lr: 0.05\n      lr: 0.04")), ok=False)
    assert result.exit_code == 1 and "gives 'lr' twice" in result.stderr


def test_keep_going_runs_what_does_not_read_a_failed_job_then_exits_1(inputs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corpus.jsonl").write_text('{"_id": "d0", "text": "w4 w5"}\n{"_id": "d1", "text": \n')
    text = RECIPE.replace("  tiny: {data}\ndatasets:", f"  tiny: {{data}}\n  bad: {bad}\ndatasets:")
    recipe = write_recipe(tmp_path / "r", inputs, text)
    stopped = run(recipe, ok=False)
    assert stopped.exit_code == 1 and "corpus.jsonl" in stopped.stderr
    assert not (tmp_path / "r" / "out" / "readapted").exists()  # the first failure stops the run

    result = run(recipe, "--keep-going", "--json", ok=False)
    assert result.exit_code == 1 and "1 job(s) failed: psi/bad" in result.stderr
    report = json.loads(result.stdout)
    assert report["failed"] == ["psi/bad"] and report["not_run"] == ["readapted/bad-alpha0.5"]
    assert report["ran"] == ["readapted/tiny-alpha0.5", "eval/tiny"] and report["skipped"] == ["psi/tiny"]
    (failed,) = [j for j in report["jobs"] if j["action"] == "failed"]
    assert "corpus.jsonl" in failed["reason"]
    assert report["table"]["tables"][0]["rows"][0]["dataset"] == "tiny"
