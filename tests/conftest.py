"""Shared fixtures: an isolated HF/reforge home, and tiny real transformers checkpoints built from configs."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("REFORGE_HOME", str(home / "reforge"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("REFORGE_PROGRESS_EVERY", "3600")  # no plain progress lines in checked stderr, however slow
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield


def _llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def build_model(kind: str, seed: int = 0, **overrides):
    """A tiny real model with random weights: kind in llama-causal, llama-bare, mistral-*, qwen2-*, bert-*."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    family, _, head = kind.partition("-")
    if family == "llama":
        config = _llama_config(**overrides)
        cls = tf.LlamaForCausalLM if head == "causal" else tf.LlamaModel
    elif family == "mistral":
        config = tf.MistralConfig(**{**_llama_config().to_dict(), "sliding_window": None, **overrides})
        cls = tf.MistralForCausalLM if head == "causal" else tf.MistralModel
    elif family == "qwen2":
        config = tf.Qwen2Config(**{**_llama_config().to_dict(), **overrides})
        cls = tf.Qwen2ForCausalLM if head == "causal" else tf.Qwen2Model
    elif family == "bert":
        config = tf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64, **overrides
        )
        cls = tf.BertForMaskedLM if head == "mlm" else tf.BertModel
    else:
        raise ValueError(kind)
    return cls(config).eval()


def save(model, path: Path, *, dtype=None, shard_size: str | None = None) -> Path:
    import torch

    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    with torch.no_grad():
        model.save_pretrained(path, **kwargs)
    return path


def perturbed_bare(causal, seed: int = 1, scale: float = 0.02):
    """The bare model inside ``causal`` with every weight nudged: a stand-in for a fine-tuned retriever."""
    import torch

    bare = causal.model if hasattr(causal, "model") else causal.bert
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in bare.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return bare


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    """(base CausalLM folder, retriever bare-model folder), bf16, untied; the retriever is sharded."""
    import copy

    import torch

    root = tmp_path_factory.mktemp("llama")
    base = build_model("llama-causal")
    base_dir = save(base, root / "base", dtype=torch.bfloat16)
    retriever = perturbed_bare(copy.deepcopy(base))
    retriever_dir = save(retriever, root / "retriever", dtype=torch.bfloat16, shard_size="20KB")
    return base_dir, retriever_dir


def make_adapter(model, path, *, dora=False, seed=5, targets=("q_proj", "v_proj", "up_proj", "down_proj"), **extra):
    """A peft adapter with non-zero B (as after training), saved to ``path``; returns the PeftModel."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), use_dora=dora, **extra)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(path)
    return peft_model


def save_tokenizer(path: Path, vocab_size: int = 128, *, bert: bool = False) -> None:
    """A small real word-level tokenizer (no downloads) saved into ``path`` next to a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["<pad>", "<unk>", "<s>", "</s>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    names = (
        dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        if bert
        else dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    )
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names).save_pretrained(path)


def run(*args, ok=True):
    """``reforge ARGS`` through click's CliRunner; with ``ok`` (default) it must exit 0 (its output shown if not)."""
    from click.testing import CliRunner

    from reforge.cli import cli

    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=not ok)
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture
def one_thread():
    """Tiny matrices on a shared 2-core machine: one torch thread is ~100x faster than two spin-waiting ones
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module that wants it)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
