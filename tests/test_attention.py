"""Packed attention against each family's own eager attention, one document at a time, on tiny random models.

Tolerances (float32 on CPU): logits within 2e-5 absolute; parameter gradients within 1e-4 relative to the largest
gradient entry of that tensor. The models' scores are made large (initializer range 0.2, a softcap of 1) so that a
missing softcap or window moves the logits by far more than that, which each test checks too.
"""

from __future__ import annotations

import pytest
import torch

from reforge.train.attention import (
    PACKED_FLEX,
    PACKED_SPLIT,
    document_mask,
    plan_attention,
    register_packed_attention,
)

WINDOW = 8
# row 0: three documents, the middle one longer than the window; row 1: one long document and a padding pseudo-doc
ROWS = [[20, 30, 11], [48, 13]]


def family_config(family: str, **extra):
    """A tiny config of ``family`` whose windows (and Gemma2's softcap) matter over the documents of ROWS."""
    import transformers as tf

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=97,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    layers = ["sliding_attention", "full_attention"]
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=WINDOW),
        "qwen2": lambda: tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, layer_types=layers),
        "qwen3": lambda: tf.Qwen3Config(**common, use_sliding_window=True, sliding_window=WINDOW, layer_types=layers),
        "gemma2": lambda: tf.Gemma2Config(
            **common, sliding_window=WINDOW, attn_logit_softcapping=1.0, query_pre_attn_scalar=16, layer_types=layers
        ),
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **common, sliding_window=WINDOW, query_pre_attn_scalar=16, layer_types=layers
        ),
        "olmo2": lambda: tf.Olmo2Config(**{k: v for k, v in common.items() if k != "head_dim"}, pad_token_id=0),
    }
    config = configs[family]()
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def build(family: str, implementation: str | None, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, **extra), attn_implementation=implementation)
    return model.float().eval()


def twin(model, implementation: str | None):
    """The same weights under another attention implementation."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)  # from_config sets the implementation on the config it is given
    other = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).float().eval()
    other.load_state_dict(model.state_dict())
    return other


def packed_inputs(seed: int = 1):
    """``(input_ids, position_ids, spans)``: ROWS packed as `collate` packs them; spans are (row, start, length)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(sum(row) for row in ROWS)
    ids = torch.randint(1, 97, (len(ROWS), width), generator=generator)
    positions = torch.zeros_like(ids)
    spans = []
    for b, row in enumerate(ROWS):
        at = 0
        for n in row:
            positions[b, at : at + n] = torch.arange(n)
            spans.append((b, at, n))
            at += n
    return ids, positions, spans


def probe(logits, seed: int = 2):
    """A fixed random linear read-out of the logits: its gradient reaches every weight through every position."""
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).to(logits.device)
    return (logits * weights).sum()


def eager_per_document(model, ids, spans):
    """Logits of each document alone under ``model`` (eager attention), and the weights' gradient of their probe."""
    model.zero_grad()
    outputs = []
    for b, start, n in spans:
        logits = model(input_ids=ids[b : b + 1, start : start + n], use_cache=False).logits[0]
        outputs.append(logits)
    probe(torch.cat(outputs)).backward()
    return outputs, {name: p.grad.clone() for name, p in model.named_parameters()}


def packed_forward(model, ids, positions, spans):
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    outputs = [logits[b, start : start + n] for b, start, n in spans]
    probe(torch.cat(outputs)).backward()
    return outputs, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(outputs, grads, ref_outputs, ref_grads):
    for mine, theirs in zip(outputs, ref_outputs):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=0)
    for name, grad in ref_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads[name], grad, atol=1e-4 * scale + 1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_split_path_gives_eager_logits_and_gradients_per_document(family):
    model = build(family, "eager")
    packed = twin(model, register_packed_attention("split"))
    ids, positions, spans = packed_inputs()
    reference = eager_per_document(model, ids, spans)
    assert_same(*packed_forward(packed, ids, positions, spans), *reference)
    # the test can fail: the same rows without document boundaries differ by far more than the tolerance
    with torch.no_grad():
        unpacked = packed(input_ids=ids, use_cache=False).logits
    assert (unpacked[0, 20:50] - reference[0][1]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2"])
def test_padded_path_gives_eager_logits_and_gradients_per_document(family):
    """--attention padded: the documents one per row, right-padded by `collate`, through the model's own default
    attention (sdpa; eager for gemma2) with the padding mask, against eager on each document alone."""
    from reforge.train.batching import collate

    model = build(family, "eager")
    plan = plan_attention(model.config, "cuda", "padded")
    assert (plan.path, plan.implementation, plan.packed) == ("padded", None, False)
    default = twin(model, plan.implementation)
    assert default.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    ids, _, spans = packed_inputs()
    docs = [ids[b, start : start + n].tolist() for b, start, n in spans]
    batch = collate([[doc] for doc in docs], pad_id=0, padded=True)
    assert batch.pad > 0 and batch.attention_mask.sum() == sum(n for _, _, n in spans)
    reference = eager_per_document(model, ids, spans)
    default.zero_grad()
    logits = default(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    outputs = [logits[i, : len(doc)] for i, doc in enumerate(docs)]
    probe(torch.cat(outputs)).backward()
    assert_same(outputs, {name: p.grad.clone() for name, p in default.named_parameters()}, *reference)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_windows_and_softcap_matter_at_these_sizes(family):
    """Without them the split path would be off: the checks above are sensitive to both features."""
    model = build(family, "eager")
    ids, positions, spans = packed_inputs()
    reference, _ = eager_per_document(model, ids, spans)
    for change in ({"sliding_window": 10_000}, {"attn_logit_softcapping": None}):
        if family == "mistral" and "attn_logit_softcapping" in change:
            continue
        other = build(family, "eager", **change)
        with torch.no_grad():
            b, start, n = spans[1]  # the 30-token document, longer than the window
            logits = other(input_ids=ids[b : b + 1, start : start + n], use_cache=False).logits[0]
        assert (logits - reference[1]).abs().max() > 1e-2, change


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_flex_path_gives_eager_logits_per_document(family):
    """The GPU path on CPU: eager flex_attention (forward only; flex_attention has no CPU backward) over the
    BlockMask its mask function builds from transformers' causal, window and packed-document masks."""
    model = build(family, "eager")
    flex = twin(model, register_packed_attention("flex"))
    ids, positions, spans = packed_inputs()
    with torch.no_grad():
        reference = [model(input_ids=ids[b : b + 1, s : s + n], use_cache=False).logits[0] for b, s, n in spans]
        logits = flex(input_ids=ids, position_ids=positions, use_cache=False).logits
    for (b, start, n), theirs in zip(spans, reference):
        torch.testing.assert_close(logits[b, start : start + n], theirs, atol=2e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_mask_is_built_once_per_forward_and_kind_of_layer(monkeypatch):
    import torch.nn.attention.flex_attention as flex_module

    built = []
    real = flex_module.create_block_mask
    monkeypatch.setattr(flex_module, "create_block_mask", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    ids, positions, _ = packed_inputs()
    masks_seen = []
    for family, kinds in (("llama", 1), ("gemma2", 2)):
        model = build(
            family,
            register_packed_attention("flex"),
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
        for layer in model.model.layers:
            layer.self_attn.register_forward_pre_hook(
                lambda module, args, kwargs: masks_seen.append(kwargs["attention_mask"]), with_kwargs=True
            )
        built.clear()
        masks_seen.clear()
        with torch.no_grad():
            model(input_ids=ids, position_ids=positions, use_cache=False)
        assert len(built) == kinds, family
        assert len(masks_seen) == 4 and {id(m) for m in masks_seen} == {id(m) for m in built}


def test_fallback_family_keeps_its_own_attention_and_stays_exact():
    config = family_config("olmo2")
    plan = plan_attention(config, "cuda")
    assert plan.path == "fallback" and plan.implementation is None and plan.packed
    assert plan.note.startswith(
        "packed attention is implemented for llama, mistral, qwen2, qwen3, gemma2, "
        "gemma3_text, not olmo2: training uses the model's own attention"
    )
    model = build("olmo2", "eager")
    default = twin(model, plan.implementation)  # sdpa: transformers builds a block-diagonal mask from the positions
    assert default.config._attn_implementation == "sdpa" and model.config._attn_implementation == "eager"
    ids, positions, spans = packed_inputs()
    assert_same(*packed_forward(default, ids, positions, spans), *eager_per_document(model, ids, spans))


def test_plan_per_device_option_dropout_and_bidirectional_attention():
    from reforge.errors import InvalidOptionError

    # no untested default: auto is split on CUDA too, until flex's gradients are compared on a GPU (gpu-check)
    for device in ("cuda", "cpu"):
        assert plan_attention(family_config("gemma2"), device).implementation == PACKED_SPLIT
    assert plan_attention(family_config("gemma2"), "cuda", "flex").implementation == PACKED_FLEX
    assert plan_attention(family_config("olmo2"), "cpu", "padded").path == "padded"  # any causal family
    refused = {
        ("llama", "cpu", "flex", None): "attention flex needs CUDA: flex_attention has no backward on cpu",
        ("llama", "cuda", "flex", 0.1): "flex_attention has no attention dropout",
        ("olmo2", "cuda", "split", None): "split: packed attention is implemented for llama",
        ("olmo2", "cuda", "flex", None): "pass --attention padded or auto",
        ("llama", "cuda", "eager", None): "must be one of auto, split, padded, flex, got 'eager'",
    }
    for (family, device, requested, dropout), message in refused.items():
        config = family_config(family, **({"attention_dropout": dropout} if dropout else {}))
        with pytest.raises(InvalidOptionError, match=message):
            plan_attention(config, device, requested)
    dropout = plan_attention(family_config("llama", attention_dropout=0.1), "cuda")
    assert (dropout.path, dropout.note) == ("split", None)  # split has dropout
    bidirectional = plan_attention(family_config("gemma3_text", use_bidirectional_attention=True), "cpu")
    assert bidirectional.path == "fallback" and "bidirectional" in bidirectional.note


def test_packed_paths_refuse_what_they_do_not_implement():
    from types import SimpleNamespace

    from reforge.train.attention import split_attention

    q = k = v = torch.zeros(1, 2, 4, 8)
    positions = torch.arange(4)[None]
    module = SimpleNamespace(training=False, num_key_value_groups=1, is_causal=True)
    with pytest.raises(RuntimeError, match="s_aux"):
        split_attention(module, q, k, v, None, position_ids=positions, s_aux=torch.zeros(2))
    with pytest.raises(RuntimeError, match="bidirectionally"):
        split_attention(SimpleNamespace(training=False, is_causal=False), q, k, v, None, position_ids=positions)
    model = build("llama", register_packed_attention("split"))
    ids, positions, _ = packed_inputs()
    with pytest.raises(ValueError, match="no padding mask"):
        model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids).tril(), use_cache=False)


def test_document_mask_is_transformers_sliding_window():
    from transformers.masking_utils import sliding_window_causal_mask_function

    n = 12
    i = torch.arange(n)
    theirs = sliding_window_causal_mask_function(5)(0, 0, i[:, None], i[None, :])
    assert torch.equal(document_mask(n, 5), theirs)
    assert document_mask(3, None).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_cli_trains_every_family_and_warns_once_on_a_fallback(family, tmp_path):
    """Gemma2 used to die in `reforge train` (its attention refuses sdpa); a fallback family trains and says so."""
    import json
    import math
    import random

    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import save_tokenizer
    from reforge.cli import cli

    base = tmp_path / family
    torch.manual_seed(0)
    config = family_config(family, vocab_size=128, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    save_tokenizer(base, 128)
    rng = random.Random(0)
    corpus = tmp_path / "docs.txt"
    corpus.write_text(
        "\n".join(" ".join(f"w{rng.randrange(120)}" for _ in range(rng.randrange(5, 40))) for _ in range(12)) + "\n"
    )
    out = tmp_path / "psi"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            str(base),
            "--corpus",
            str(corpus),
            "--per-line",
            "-o",
            str(out),
            "--max-length",
            "64",
            "-r",
            "4",
            "--json",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)["record"]
    assert record["attention"]["path"] == ("split" if family == "gemma2" else "fallback")
    assert record["steps"] == 3 and math.isfinite(record["loss"]["final"])  # 12 documents, 4 a step
    assert result.stderr.count("packed attention is implemented for") == (family == "olmo2")
    trained = load_file(out / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and float(t.abs().max()) > 0 for name, t in trained.items())
