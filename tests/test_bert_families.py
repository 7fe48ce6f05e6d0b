"""BERT-family retrievers (issue 14): dense or LoRA, the merged output's config names the bare class, the pooler is
carried when the retriever has one, and AutoModel loads it with nothing missing and the retriever's hidden states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from reforge.cli import cli

FAMILIES = ["bert", "xlm-roberta", "modernbert"]


def run(*args):
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    return result


def family_models(family: str):
    """(base class, bare class, config, LoRA targets) of a tiny model of ``family``."""
    import transformers as tf

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    if family == "bert":
        return tf.BertForPreTraining, tf.BertModel, tf.BertConfig(**small), ["query", "value"]
    if family == "xlm-roberta":
        return tf.XLMRobertaForMaskedLM, tf.XLMRobertaModel, tf.XLMRobertaConfig(**small), ["query", "value"]
    config = tf.ModernBertConfig(
        **small,
        global_attn_every_n_layers=2,
        local_attention=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        cls_token_id=2,
        sep_token_id=3,
    )
    return tf.ModernBertForMaskedLM, tf.ModernBertModel, config, ["Wqkv", "Wo"]


def save_base(family: str, folder: Path) -> Path:
    """The pretrained checkpoint as it is published: the MLM (BERT: pretraining) model, with the pooler it has
    (bert-base: ``bert.pooler``; XLM-R's MLM class has none, so one is stored beside it, as in xlm-roberta-base)."""
    from safetensors.torch import load_file, save_file

    base_cls, bare_cls, config, _ = family_models(family)
    torch.manual_seed(0)
    model = base_cls(config).eval()
    model.save_pretrained(folder)
    if family == "xlm-roberta":
        state = load_file(folder / "model.safetensors")
        pooler = bare_cls(config).pooler
        state |= {f"roberta.pooler.{k}": v.contiguous() for k, v in pooler.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["dense", "lora"])
def test_bert_family_retriever_merges_to_a_loadable_bare_model(tmp_path, family, kind):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base_cls, bare_cls, _, targets = family_models(family)
    base_dir = save_base(family, tmp_path / "base")
    retriever = AutoModel.from_pretrained(base_dir).eval()
    assert type(retriever) is bare_cls
    if kind == "dense":
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for parameter in retriever.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        retriever.save_pretrained(tmp_path / "retriever")
        expected_model = retriever
    else:
        torch.manual_seed(4)
        lora = get_peft_model(retriever, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        lora.save_pretrained(tmp_path / "retriever")
        expected_model = lora.merge_and_unload().eval()
    out = tmp_path / "out"
    run("merge", "--base", base_dir, "--retriever", tmp_path / "retriever", "-o", out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [bare_cls.__name__]
    loaded, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(loaded) is bare_cls
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if hasattr(loaded, "pooler") and loaded.pooler is not None:  # carried, not re-initialized
        assert torch.equal(loaded.pooler.dense.weight, expected_model.pooler.dense.weight)
    ids = torch.tensor([[2, 5, 9, 17, 30, 3]])
    assert (hidden(loaded.eval(), ids) - hidden(expected_model, ids)).abs().max() < 1e-5
