"""The family matrix (issue 14's bar for done): for Llama, Mistral, Qwen2, Qwen3, Gemma2, BERT and XLM-R, tiny random
models run through diff, train, merge (--retriever and --delta), verify and encode (eval); and a RE-Adapt chat run.

Each retriever is saved in a folder named like the real retriever of its family, so the encoding profile is detected
from the name, written by merge into ``reforge_encoding.json`` and checked by verify. CPU-cheap: 2 layers, hidden 32,
a few SciFact documents, one or two training steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, make_adapter, run, save, save_tokenizer

SCIFACT = DATA / "scifact"
DECODERS = {
    # family: (retriever folder name, expected profile, LoRA targets)
    "llama": ("repllama-tiny", "repllama", ("q_proj", "v_proj")),
    "mistral": ("e5-mistral-tiny", "e5-mistral", ("q_proj", "v_proj")),
    "qwen2": ("gte-Qwen2-tiny-instruct", "gte-qwen2", ("q_proj", "v_proj")),
    "qwen3": ("Qwen3-Embedding-tiny", "qwen3-embedding", ("q_proj", "v_proj")),
    "gemma2": ("bge-multilingual-gemma2-tiny", "bge-gemma2", ("q_proj", "v_proj")),
}
ENCODERS = {"bert": ("query", "value"), "xlm-roberta": ("query", "value")}
FAMILIES = [*DECODERS, *ENCODERS]


def train_args(base: Path, out: Path, targets: str) -> list:
    """`reforge train` on 4 SciFact documents, 32 tokens each: one or two steps."""
    return ["train", base, "--corpus", SCIFACT, "-o", out, "--max-docs", 4, "--max-length", 32, "-r", 4,
            "--lora-alpha", 8, "--batch-size", 2, "--target-modules", targets]  # fmt: skip


def tensors(folder: Path) -> dict:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def decoder(family: str):
    """A tiny causal LM of ``family`` (vocab 600 for the BPE tokenizer of test_train)."""
    import transformers as tf

    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=600,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    classes = {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, {}),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig, {"sliding_window": None}),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, {}),
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config, {"head_dim": 8}),
        "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config, {"head_dim": 8, "sliding_window": 16}),
    }
    model_cls, config_cls, extra = classes[family]
    return model_cls(config_cls(**common, **extra)).eval()


def nudged(model, seed: int, scale: float = 0.02):
    """``model`` with every weight moved a little: a stand-in for fine-tuning."""
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return tuned.eval()


@pytest.fixture(scope="module")
def bpe():
    from test_train import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from test_eval import toy_dataset

    return toy_dataset(tmp_path_factory.mktemp("toy") / "toy")


def prepare(family: str, root: Path, bpe) -> dict:
    """Base (pretrained LM as published), dense retriever (sentence-transformers folder for encoders) and a peft
    knowledge adapter trained on the base."""
    if family in DECODERS:
        name, profile, targets = DECODERS[family]
        base = decoder(family)
        base_dir = save(base, root / "base")
        bpe.save_pretrained(base_dir)
        retriever_dir = save(nudged(base.model, seed=1), root / name)
        bpe.save_pretrained(retriever_dir)
    else:
        from test_bert_families import save_base
        from transformers import AutoModel

        targets, profile = ENCODERS[family], "sentence-transformers"
        base_dir = save_base(family, root / "base")
        save_tokenizer(base_dir, 64, bert=True)
        base = AutoModel.from_pretrained(base_dir)
        retriever_dir = _st_folder(nudged(base, seed=1), root / f"{family}-retriever")
    make_adapter(base, root / "psi", dora=True, targets=targets)
    return {"base": base_dir, "retriever": retriever_dir, "psi": root / "psi", "profile": profile, "targets": targets}


def _st_folder(model, folder: Path) -> Path:
    """A sentence-transformers 6 folder (mean pooling, Normalize) around ``model``."""
    save(model, folder)
    save_tokenizer(folder, 64, bert=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean", "include_prompt": True}))
    (folder / "2_Normalize").mkdir()
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_diff_merge_both_paths_verify_encode(family, tmp_path, bpe, toy):
    from transformers import AutoModel

    inputs = prepare(family, tmp_path, bpe)
    run("diff", inputs["base"], inputs["retriever"], "-o", tmp_path / "delta", "--dtype", "float32")
    outs = {}
    for path, source in (("retriever", inputs["retriever"]), ("delta", tmp_path / "delta")):
        out = outs[path] = tmp_path / f"merged-{path}"
        run(
            "merge",
            "--base",
            inputs["base"],
            f"--{path}",
            source,
            "--adapter",
            inputs["psi"],
            "--alpha",
            "0.5",
            "-o",
            out,
        )
        profile = json.loads((out / "reforge_encoding.json").read_text())
        assert profile["name"] == inputs["profile"]
        report = json.loads(run("verify", out, "--json").stdout)
        checks = {c["name"]: c for c in report["checks"]}
        assert report["ok"] and checks["recompute"]["ok"] and checks["encoding"]["ok"], report
        assert checks["embeddings"]["detail"].startswith("cosine(retriever, new)")
    by_retriever, by_delta = tensors(outs["retriever"]), tensors(outs["delta"])
    assert by_retriever.keys() == by_delta.keys()
    assert max(float((by_retriever[k].float() - by_delta[k].float()).abs().max()) for k in by_retriever) < 1e-5
    config = json.loads((outs["retriever"] / "config.json").read_text())
    assert not config["architectures"][0].endswith(("ForCausalLM", "ForMaskedLM", "ForPreTraining"))
    _, info = AutoModel.from_pretrained(outs["retriever"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    task = ["--task", "Given a question, retrieve passages that answer it"]  # toy is no BEIR dataset with a task
    result = json.loads(
        run("eval", outs["delta"], inputs["retriever"], "-d", toy, "--json", "--no-cache", *task).stdout
    )
    merged, original = result["models"]
    assert merged["profile"] == original["profile"]  # the merged model encodes exactly like its retriever
    assert merged["profile"]["name"] == inputs["profile"]
    scores = [r["scores"]["nDCG@10"] for r in result["results"]] if "results" in result else []
    assert all(0 <= s <= 1 for s in scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_train_then_merge(family, tmp_path, bpe):
    inputs = prepare(family, tmp_path, bpe)
    targets = ",".join(inputs["targets"])
    args = [*train_args(inputs["base"], tmp_path / "trained", targets), "--json"]
    if family in ENCODERS:  # the knowledge adapter is trained by next-token prediction: causal LMs only
        result = run(*args, ok=False)
        assert result.exit_code == 1 and "not a causal LM with an LM head" in result.stderr
        return
    report = json.loads(run(*args).stdout)
    assert report["documents"] == 4 and report["steps"] >= 1
    out = tmp_path / "merged"
    run(
        "merge",
        "--base",
        inputs["base"],
        "--retriever",
        inputs["retriever"],
        "--adapter",
        tmp_path / "trained",
        "--alpha",
        "0.5",
        "-o",
        out,
    )
    report = json.loads(run("verify", out, "--json").stdout)
    assert report["ok"], report


def test_matrix_readapt_chat_model(tmp_path, bpe):
    """RE-Adapt of a chat model (Qwen3, untied head): diff, train on the base, merge by both paths, verify,
    generate."""
    from transformers import AutoModelForCausalLM

    base = decoder("qwen3")
    base_dir = save(base, tmp_path / "base")
    instruct_dir = save(nudged(base, seed=2), tmp_path / "instruct")
    for folder in (base_dir, instruct_dir):
        bpe.save_pretrained(folder)
    run(*train_args(base_dir, tmp_path / "psi", "q_proj,v_proj"))
    run("diff", base_dir, instruct_dir, "-o", tmp_path / "delta", "--keep-lm-head", "--dtype", "float32")
    outs = []
    for path, source in (("retriever", instruct_dir), ("delta", tmp_path / "delta")):
        out = tmp_path / f"chat-{path}"
        run(
            "merge",
            "--base",
            base_dir,
            f"--{path}",
            source,
            "--adapter",
            tmp_path / "psi",
            "--alpha",
            "0.5",
            "--keep-lm-head",
            "-o",
            out,
        )
        assert json.loads(run("verify", out, "--json").stdout)["ok"]
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and type(model).__name__ == "Qwen3ForCausalLM"
        ids = torch.tensor([[1, 40, 41, 42]])
        assert model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)
        outs.append(tensors(out))
    assert "lm_head.weight" in outs[0] and outs[0].keys() == outs[1].keys()
    assert max(float((outs[0][k] - outs[1][k]).abs().max()) for k in outs[0]) < 1e-5
