"""reforge merge: exactness against references built in memory, layouts, and bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model, make_adapter, perturbed_bare, run, save, save_tokenizer


def merge(setup, *options, ok=True):
    """`reforge merge` of the module's base and retriever with these options (adapters, alphas, -o, flags)."""
    return run("merge", "--base", setup["base_dir"], "--retriever", setup["retriever_dir"], *options, ok=ok)


def tensors(folder):
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """fp32 base CausalLM, a bare retriever (sharded, with tokenizer), and a DoRA + a LoRA knowledge adapter."""
    root = tmp_path_factory.mktemp("merge")
    base = build_model("llama-causal")
    base_dir = save(base, root / "base")
    save_tokenizer(base_dir)
    retriever = perturbed_bare(copy.deepcopy(base))
    retriever_dir = save(retriever, root / "retriever", shard_size="30KB")
    save_tokenizer(retriever_dir)
    dora = make_adapter(base, root / "dora", dora=True, targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))
    lora = make_adapter(base, root / "lora", seed=7, targets=("o_proj", "q_proj"))
    return dict(
        root=root, base=base, base_dir=base_dir, retriever=retriever, retriever_dir=retriever_dir, dora=dora, lora=lora
    )


def psi(peft_model, base):
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    return {k.removeprefix("model."): merged[k] - v for k, v in base.state_dict().items() if k.startswith("model.")}


def test_alpha_zero_reproduces_the_retriever_bit_for_bit(setup, tmp_path):
    out = tmp_path / "out"
    merge(setup, "--adapter", setup["root"] / "dora", "--alpha", "0", "-o", out)
    got, expected = tensors(out), tensors(setup["retriever_dir"])
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in expected)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (setup["retriever_dir"] / "config.json").read_text()
    )
    # the tokenizer is the retriever's, but for the EOS the profile appends (see tests/test_st_folder.py)
    got, original = (json.loads((folder / "tokenizer.json").read_text()) for folder in (out, setup["retriever_dir"]))
    assert got.pop("post_processor") != original.pop("post_processor") and got == original


def test_dora_merge_equals_formula_and_embeddings_match_reference_model(setup, tmp_path):
    from transformers import AutoModel, LlamaModel

    out = tmp_path / "out"
    merge(setup, "--adapter", setup["root"] / "dora", "-o", out)
    update = psi(setup["dora"], setup["base"])
    reference_state = {k: v + 0.5 * update[k] for k, v in setup["retriever"].state_dict().items()}
    got = tensors(out)
    assert set(got) == set(reference_state) and "lm_head.weight" not in got
    worst = max(float((got[k] - reference_state[k]).abs().max()) for k in got)
    assert worst < 1e-6
    changed = [k for k in got if not torch.equal(got[k], setup["retriever"].state_dict()[k])]
    assert len(changed) == 2 * 5  # q,k,v,up,down in 2 layers
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "LlamaModel"
    reference = LlamaModel(setup["retriever"].config)
    reference.load_state_dict(reference_state)
    ids = torch.tensor([[1, 5, 9, 22, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids).last_hidden_state, reference.eval()(ids).last_hidden_state, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "reforge" in card and "local folder `retriever`" in card and "alpha" in card


def test_two_adapters_each_with_its_alpha(setup, tmp_path):
    out = tmp_path / "out"
    merge(
        setup,
        "--adapter",
        setup["root"] / "dora",
        "--alpha",
        "0.5",
        "--adapter",
        setup["root"] / "lora",
        "--alpha",
        "0.3",
        "-o",
        out,
    )
    first, second = psi(setup["dora"], setup["base"]), psi(setup["lora"], setup["base"])
    got = tensors(out)
    for key, value in setup["retriever"].state_dict().items():
        assert (got[key] - (value + 0.5 * first[key] + 0.3 * second[key])).abs().max() < 1e-6, key
    manifest = json.loads((out / "reforge.json").read_text())
    assert [a["alpha"] for a in manifest["adapters"]] == [0.5, 0.3]


def test_merge_through_stored_delta_differs_only_by_its_rounding(setup, tmp_path):
    delta = tmp_path / "delta"
    run("diff", setup["base_dir"], setup["retriever_dir"], "-o", delta, "--dtype", "bfloat16")
    rounding = json.loads((delta / "reforge.json").read_text())["max_abs_rounding"]
    assert rounding > 0
    for name, source in (("via_delta", ["--delta", delta]), ("via_retriever", ["--retriever", setup["retriever_dir"]])):
        run("merge", "--base", setup["base_dir"], *source, "--adapter", setup["root"] / "dora", "-o", tmp_path / name)
    a, b = tensors(tmp_path / "via_delta"), tensors(tmp_path / "via_retriever")
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < worst <= rounding * (1 + 1e-6) + 1e-6
    assert all(a[k].dtype == b[k].dtype == torch.float32 for k in a)  # retriever's dtype, not the delta's bf16
    assert (tmp_path / "via_delta" / "tokenizer.json").is_file()


def test_beta_scales_delta(setup, tmp_path):
    out = tmp_path / "out"
    run("merge", "--base", setup["base_dir"], "--retriever", setup["retriever_dir"], "--beta", "0.5", "-o", out)
    got, base = tensors(out), setup["base"].state_dict()
    for key, value in setup["retriever"].state_dict().items():
        expected = base["model." + key] + 0.5 * (value - base["model." + key])
        assert (got[key] - expected).abs().max() < 1e-6


def test_lora_retriever_becomes_a_full_bare_model(setup, tmp_path):
    from transformers import AutoModel

    retriever = make_adapter(
        setup["base"].model, tmp_path / "repllama", seed=11, targets=("q_proj", "v_proj", "o_proj", "gate_proj")
    )
    out = tmp_path / "out"
    run(
        "merge",
        "--base",
        setup["base_dir"],
        "--retriever",
        tmp_path / "repllama",
        "--adapter",
        setup["root"] / "dora",
        "-o",
        out,
    )
    merged_retriever = copy.deepcopy(retriever).merge_and_unload().state_dict()
    update = psi(setup["dora"], setup["base"])
    got = tensors(out)
    for key, value in merged_retriever.items():
        assert (got[key] - (value + 0.5 * update[key])).abs().max() < 1e-6, key
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaModel"]
    assert type(AutoModel.from_pretrained(out)).__name__ == "LlamaModel"


def test_sentence_transformers_retriever_keeps_its_modules(tmp_path):
    from sentence_transformers import SentenceTransformer, models

    base = build_model("bert-mlm")
    base_dir = save(base, tmp_path / "base")
    bert_dir = save(perturbed_bare(copy.deepcopy(base)), tmp_path / "bert")
    save_tokenizer(bert_dir, 64, bert=True)
    transformer = models.Transformer(str(bert_dir), max_seq_length=32)
    st = SentenceTransformer(modules=[transformer, models.Pooling(32, "mean"), models.Normalize()])
    st.save(str(tmp_path / "st"))
    adapter = make_adapter(base, tmp_path / "psi", dora=True, targets=("query", "value"))
    assert adapter is not None
    out = tmp_path / "out"
    run(
        "merge",
        "--base",
        base_dir,
        "--retriever",
        tmp_path / "st",
        "--adapter",
        tmp_path / "psi",
        "--alpha",
        "0",
        "-o",
        out,
    )
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (tmp_path / "st" / name).read_bytes()
    loaded = SentenceTransformer(str(out), device="cpu")
    sentences = ["w1 w2 w3", "w4 w5"]
    assert torch.allclose(torch.tensor(loaded.encode(sentences)), torch.tensor(st.encode(sentences)), atol=1e-6)
    assert "library_name: sentence-transformers" in (out / "README.md").read_text()


def test_dry_run_prints_the_plan_and_writes_nothing(setup, tmp_path):
    result = merge(setup, "--adapter", setup["root"] / "dora", "-o", tmp_path / "out", "--dry-run")
    assert "retriever + 0.5*psi[dora]" in result.stdout and "Nothing written" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--alpha", "nan"], "must be a finite number"),
        (["--beta", "inf"], "--beta is inf"),
    ],
)
def test_non_finite_weights_are_refused(setup, tmp_path, flags, message):
    adapter = ["--adapter", setup["root"] / "dora"] if "--alpha" in flags else []
    result = merge(setup, *adapter, *flags, "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and message in result.stderr


def test_adapter_for_another_base_is_refused_before_writing(setup, tmp_path):
    other = build_model("llama-causal", intermediate_size=48)
    make_adapter(other, tmp_path / "psi", dora=True)
    result = merge(setup, "--adapter", tmp_path / "psi", "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and "do not fit the base tensor" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_adapter_recorded_for_another_base_is_refused(setup, tmp_path):
    import shutil

    shutil.copytree(setup["root"] / "dora", tmp_path / "psi")
    (tmp_path / "psi" / "training_record.json").write_text(json.dumps({"base": {"fingerprint": "0" * 32}}))
    result = merge(setup, "--adapter", tmp_path / "psi", "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and "was trained on base fingerprint 0000" in result.stderr


def test_delta_from_another_base_is_refused(setup, tmp_path):
    other_dir = save(build_model("llama-causal", seed=9), tmp_path / "other")
    run("diff", other_dir, setup["retriever_dir"], "-o", tmp_path / "delta")
    result = run("merge", "--base", setup["base_dir"], "--delta", tmp_path / "delta", "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and "was computed from base" in result.stderr


def test_adapter_targeting_modules_the_retriever_lacks(setup, tmp_path):
    from safetensors.torch import save_file

    make_adapter(setup["base"], tmp_path / "psi", targets=("q_proj",))
    file = tmp_path / "psi" / "adapter_model.safetensors"
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in load_file(file).items()}, file)
    result = merge(setup, "--adapter", tmp_path / "psi", "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 1
    assert "adapts 1 tensor(s) the retriever does not have (e.g. 'layers.7.self_attn.q_proj.weight')" in result.stderr


def test_adapter_count_and_alpha_count_must_match(setup, tmp_path):
    result = merge(
        setup, "--adapter", setup["root"] / "dora", "--alpha", "0.5", "--alpha", "0.2", "-o", tmp_path / "out", ok=False
    )
    assert result.exit_code == 2 and "one --alpha per --adapter" in result.stderr


def test_rerun_is_a_no_op_and_overwrite_is_required_for_other_content(setup, tmp_path):
    out = tmp_path / "out"
    args = [
        "merge",
        "--base",
        setup["base_dir"],
        "--retriever",
        setup["retriever_dir"],
        "--adapter",
        setup["root"] / "dora",
        "-o",
        out,
    ]
    run(*args)
    assert "already holds this exact" in run(*args).stdout
    result = run(*args[:-2], "--alpha", "0.25", "-o", out, ok=False)
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    run(*args[:-2], "--alpha", "0.25", "-o", out, "--overwrite")


def test_merged_lora_retriever_keeps_its_encoding_convention(setup, tmp_path):
    """A merged RepLLaMA is a bare Llama named nothing like "repllama": the profile travels in the folder."""
    from reforge.profiles import detect_profile

    make_adapter(setup["base"].model, tmp_path / "repllama", seed=11)
    out = tmp_path / "readapted"
    run("merge", "--base", setup["base_dir"], "--retriever", tmp_path / "repllama", "-o", out)
    profile = detect_profile(out, name=str(out))
    assert (profile.query_prefix, profile.passage_prefix, profile.pooling, profile.append_eos) == (
        "query: ",
        "passage: ",
        "last",
        True,
    )
    card = (out / "README.md").read_text()
    assert "query: " in card


def test_the_methods_default_weights_have_one_home(tmp_path):
    """RE-AdaptIR's alpha 0.5 and beta 1, and tune's alpha grid, live in `reforge.ops.defaults`: the API's defaults
    (merge, tune), the commands' option defaults and what --help promises, verify's reading of a record that lacks
    them, and a recipe's merge step without alpha all read them there."""
    import inspect

    from reforge.cli.merge import merge_cmd
    from reforge.cli.options import adapter_pairs
    from reforge.cli.tune import tune_cmd
    from reforge.ops import defaults
    from reforge.ops.merge import merge as merge_api
    from reforge.ops.verify import VerifyInputs, _sources
    from reforge.recipe.spec import _alpha
    from reforge.tune import DEFAULT_ALPHAS, parse_grid
    from reforge.tune import tune as tune_api

    PAPER_ALPHA = defaults.PAPER_ALPHA
    assert (PAPER_ALPHA, defaults.PAPER_BETA) == (0.5, 1.0)
    assert DEFAULT_ALPHAS is defaults.DEFAULT_ALPHAS == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert adapter_pairs(("a/", "b/"), ()) == [("a/", PAPER_ALPHA), ("b/", PAPER_ALPHA)]
    assert _alpha(tmp_path / "r.yaml", None, "steps.merge") == [PAPER_ALPHA]
    assert f"(default {PAPER_ALPHA:g} each)" in run("merge", "--help").stdout
    merge_option = {p.name: p.default for p in merge_cmd.params}
    assert merge_option["beta"] == inspect.signature(merge_api).parameters["beta"].default == defaults.PAPER_BETA
    tune_option, tune_api_default = {p.name: p.default for p in tune_cmd.params}, inspect.signature(tune_api).parameters
    assert parse_grid(tune_option["alphas"]) == tune_api_default["alphas"].default == defaults.DEFAULT_ALPHAS
    assert parse_grid(tune_option["betas"]) == tune_api_default["betas"].default == (defaults.PAPER_BETA,)
    assert "[default: 0,0.25,0.5,0.75,1]" in " ".join(run("tune", "--help").stdout.split())
    recorded = _sources({"adapters": [{"path": str(tmp_path)}]}, VerifyInputs())  # a record without alpha or beta
    assert recorded.adapters == [(str(tmp_path), defaults.PAPER_ALPHA)] and recorded.beta == defaults.PAPER_BETA


def test_an_adapters_corpus_recorded_relative_to_it_is_recorded_relative_to_the_merge(setup, tmp_path):
    """train records its corpus relative to the adapter folder; the merge's reforge.json names the same file
    relative to the merged folder (not the adapter's relative path read from elsewhere)."""
    import shutil

    corpus = tmp_path / "data" / "scifact" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True)
    corpus.write_text('{"_id": "1", "text": "a"}\n')
    shutil.copytree(setup["root"] / "dora", tmp_path / "runs" / "psi")
    record = {
        "paths_relative_to": "the folder holding this file",
        "corpus": {"paths": ["../../data/scifact/corpus.jsonl"]},
    }
    (tmp_path / "runs" / "psi" / "training_record.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    merge(setup, "--adapter", tmp_path / "runs" / "psi", "-o", out)
    recorded = json.loads((out / "reforge.json").read_text())["adapters"][0]["corpus"]
    assert recorded == "../data/scifact/corpus.jsonl"
    assert (out / recorded).resolve() == corpus.resolve()
    assert "`scifact/corpus.jsonl`" in (out / "README.md").read_text()
