"""reforge.train.plan against tensors a training step really allocates: parameter, gradient and AdamW bytes
exactly, activations (what autograd saves for backward) within 25%, with and without gradient checkpointing.

The model is built by `setup_model` (peft DoRA, reforge's weight norm, the split attention) from a tiny config of
each family; a forward pass of ``batch_size`` documents of ``max_length`` tokens, the plan's worst case, goes
through it as one batch, as on a GPU. Saved tensors are counted once per storage by a saved-tensors hook,
parameters excluded; under gradient checkpointing each layer keeps its input instead (read by a forward pre-hook,
counted once with what the hook sees). Not counted: the weight-shaped bf16 copies the CPU's bf16 matmul saves for
its backward (``MmBackward``'s transposed weight: 0.38 MB of 2.0 MB here), which cuBLAS does not make; the plan is
for a GPU. No activation here has a weight's shape (80 tokens a pass, widths 64, 96, 32, 4).
"""

from __future__ import annotations

import pytest
import torch
from test_attention import family_config

from reforge.dist import Ranks
from reforge.train.config import TrainConfig
from reforge.train.dora import setup_model
from reforge.train.plan import HEADROOM, meta_model, plan_hours, plan_memory

BATCH, LENGTH = 2, 40
# windows longer than the documents: on CPU a banded window sends sdpa to its math kernel, which saves the scores
# (the GPU kernels do not), so the CPU could not measure what the plan counts for a GPU
NO_WINDOW = {"sliding_window": 4096}


def _build(tmp_path, family: str, precision: str = "fp32", checkpointing: bool = False, **adapter):
    overrides = {**NO_WINDOW, "num_hidden_layers": 4, "max_position_embeddings": 256}
    if family in ("qwen3", "gemma2"):
        overrides["layer_types"] = ["sliding_attention", "full_attention"] * 2
    config = family_config(family, **overrides)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    options = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "batch_size": BATCH, "max_length": LENGTH, **adapter}
    train = TrainConfig(
        base=str(tmp_path / "base"),
        corpus=["unused"],
        output=str(tmp_path / "psi"),
        precision=precision,
        gradient_checkpointing=checkpointing,
        **options,
    )
    run = setup_model(train, tmp_path / "base", Ranks(), torch.device("cpu"), total_steps=1)
    plan = plan_memory(
        config,
        target_modules=train.target_modules,
        r=train.r,
        use_dora=train.use_dora,
        lora_dropout=train.lora_dropout,
        batch_size=BATCH,
        max_length=LENGTH,
        bf16=precision == "bf16",
        attention=run.attention.path,
    )
    return run, plan


def _saved_bytes(run) -> tuple[int, int]:
    """``(bytes autograd saves in one training forward and loss, bytes of the decoder layers' inputs)``, each
    storage once: the two overlap under checkpointing (its layers' inputs are saved for the recomputation)."""
    import torch.nn.functional as F

    params = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
    weight_shapes = {s for m in run.model.modules() if isinstance(m, torch.nn.Linear) for s in _both(m.weight.shape)}
    saved: dict[int, int] = {}
    inputs: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        cpu_copy = t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes
        if storage.data_ptr() not in params and not cpu_copy:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def layer_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs[hidden.untyped_storage().data_ptr()] = hidden.untyped_storage().nbytes()

    layers = [m for n, m in run.model.named_modules() if n.endswith(tuple(f"layers.{i}" for i in range(64)))]
    handles = [layer.register_forward_pre_hook(layer_input, with_kwargs=True) for layer in layers]
    ids = torch.randint(4, 90, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(LENGTH).expand(BATCH, LENGTH)
    run.model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if run.bf16 else torch.autocast("cpu", enabled=False)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast:
                logits = run.model(input_ids=ids, position_ids=positions, use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="sum")
    finally:
        for handle in handles:
            handle.remove()
    loss.backward()
    return sum(v for k, v in saved.items() if k not in inputs), sum(inputs.values())


def _both(shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(shape), tuple(shape)[::-1]


@pytest.mark.parametrize(
    "family, precision, adapter",
    [
        ("llama", "fp32", {}),
        ("llama", "bf16", {}),
        ("llama", "fp32", {"use_dora": False, "lora_dropout": 0.0}),
        ("qwen3", "fp32", {}),
        ("gemma2", "bf16", {}),
    ],
)
def test_parameters_gradients_and_adamw_state_are_exact(family, precision, adapter, tmp_path):
    run, plan = _build(tmp_path, family, precision, **adapter)
    frozen = {p.untyped_storage().data_ptr(): p for p in run.model.parameters() if not p.requires_grad}
    assert plan.weights == sum(p.numel() * p.element_size() for p in frozen.values())
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert plan.adapter == sum(p.numel() * p.element_size() for p in trainable) > 0
    _saved_bytes(run)  # a forward and backward: every trainable tensor gets its gradient
    assert plan.gradients == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    run.optimizer.step()
    moments = [t for state in run.optimizer.state.values() for k, t in state.items() if k != "step"]
    assert len(moments) == 2 * len(trainable)
    assert plan.optimizer == sum(t.numel() * t.element_size() for t in moments)


@pytest.mark.parametrize(
    "family, precision",
    [
        ("llama", "fp32"),
        ("llama", "bf16"),
        ("mistral", "fp32"),
        ("qwen3", "fp32"),
        ("qwen3", "bf16"),
        ("gemma2", "fp32"),
        ("gemma2", "bf16"),
    ],
)
def test_activations_within_a_quarter_of_what_autograd_saves(family, precision, tmp_path):
    run, plan = _build(tmp_path / "plain", family, precision)
    outside, inputs = _saved_bytes(run)
    saved = outside + inputs  # every layer input is saved anyway (by its first norm)
    assert abs(plan.activations - saved) <= 0.25 * saved, (plan.activations, saved)
    # checkpointing: the layers' inputs stay, the rest of a layer exists again only during its own backward
    run, plan = _build(tmp_path / "checkpointed", family, precision, checkpointing=True)
    outside, inputs = _saved_bytes(run)
    resident = plan.activations_checkpointed - plan.layer_activations
    assert abs(resident - (outside + inputs)) <= 0.25 * (outside + inputs), (resident, outside, inputs)
    assert plan.activations_checkpointed < plan.activations


def test_seven_billion_plan_and_the_fit():
    """Llama-2-7B's shapes on the meta device: 6.74e9 parameters; the paper's adapter; checkpointing's saving."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    model = meta_model(config)
    plan = plan_memory(config, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], r=32, model=model)
    assert plan.weights == 6_738_415_616 * 2
    # DoRA r 32 on q, k, v (4096 x 4096), up (4096 -> 11008), down (11008 -> 4096): r (in + out) + out each
    per_layer = 3 * (32 * 8192 + 4096) + 2 * (32 * 15104) + 11008 + 4096
    assert plan.adapter == 32 * per_layer * 4 and plan.optimizer == 2 * plan.adapter
    assert plan.tokens == 4 * 1024
    assert plan.fits(80 * 10**9) and not plan.fits(16 * 10**9)
    assert plan.peak(checkpointing=True) < plan.peak() < 80 * 10**9 * (1 - HEADROOM)
    assert plan_hours(3_600_000, 1000.0) == 1.0 and plan_hours(10, None) is None


def test_dry_run_prints_the_memory_plan_the_fit_and_the_hours(tmp_path):
    import json

    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from conftest import save_tokenizer
    from reforge.cli import cli

    config = family_config("llama", vocab_size=128, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base", 128)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("".join(f"w{i} w{i + 1} w{i + 2}\n" for i in range(10)))
    common = ["train", str(tmp_path / "base"), "--corpus", str(corpus), "--per-line", "-o", str(tmp_path / "psi")]
    common += ["--max-length", "64", "--dry-run"]
    runner = CliRunner()
    result = runner.invoke(cli, [*common, "--json", "--gpu-memory", "2MB", "--throughput", "10"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)["record"]
    memory = record["memory"]
    expected = plan_memory(
        config, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], r=32, max_length=64
    )
    assert memory["peak"] == expected.peak() and memory["peak_checkpointed"] == expected.peak(True)
    assert (memory["precision"], memory["attention"], memory["gpu_memory"]) == ("bf16", "split", 2 * 10**6)
    assert memory["fits"] is (expected.peak() <= 1.8e6) and memory["fits_checkpointed"] is (
        expected.peak(True) <= 1.8e6
    )
    assert record["time"]["tokens"] == record["tokens"]["input"] == 10 * 4  # 3 words + EOS each
    assert record["time"]["hours"] == pytest.approx(40 / 10 / 3600)
    text = runner.invoke(cli, common)
    assert text.exit_code == 0, text.output
    assert "throughput not measured yet" in text.stdout and "fits 80 GB" in text.stdout
    assert "with --gradient-checkpointing" in text.stdout


def test_attention_flex_on_a_cpu_is_refused_before_the_corpus_is_read(tmp_path):
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from conftest import save_tokenizer
    from reforge.cli import cli

    config = family_config("llama", vocab_size=128, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base", 128)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("not json\n")  # reading it would fail with another error
    result = CliRunner().invoke(
        cli,
        [
            "train",
            str(tmp_path / "base"),
            "--corpus",
            str(corpus),
            "-o",
            str(tmp_path / "psi"),
            "--attention",
            "flex",
            "--max-length",
            "64",
        ],
    )
    assert result.exit_code != 0 and "attention flex needs CUDA" in result.stderr, result.output
    assert not (tmp_path / "psi").exists()
