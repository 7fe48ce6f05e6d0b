"""Shared fixtures: an isolated HF/reforge home, and tiny real transformers checkpoints built from configs."""

from __future__ import annotations

import os
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
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield


def _llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
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
        config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               vocab_size=64, **overrides)
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
