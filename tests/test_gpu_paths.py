"""The CUDA-only paths against the tested ones, on the device (``pytest -m gpu``; bench/gpu_check.py runs them).

Every test here is marked ``gpu`` (off by default) and runs on ``REFORGE_TEST_DEVICE`` (default ``cuda``; skipped
without CUDA). ``make gpu-check SMOKE=1`` runs them with ``REFORGE_TEST_DEVICE=cpu`` so the harness itself cannot
rot; there flex's gradients are skipped (flex_attention has no CPU backward) and the device-vs-CPU comparisons
compare the CPU with itself.

Tolerances. Each path is compared with a float32 reference on the same device (eager attention over each document
alone): a path's error is max |path - reference| / max |reference|, per logits tensor and per parameter gradient.
flex passes when its error is at most twice split's (the tested path) plus a floor: 1e-4 in float32, 2e-2 in bf16
(a few bf16 roundings, whose unit is 2^-8).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_attention import build, eager_per_document, packed_inputs, probe, twin

from reforge.train.attention import register_packed_attention

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("REFORGE_TEST_DEVICE", "cuda")
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
FAMILIES = ["llama", "mistral", "qwen3", "gemma2"]


@pytest.fixture(scope="module")
def device():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs CUDA (REFORGE_TEST_DEVICE=cpu runs the harness on the CPU)")
    return torch.device(DEVICE)


def _error(mine, reference) -> float:
    return float((mine.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-30))


def _path_errors(model, ids, positions, spans, reference, backward: bool) -> tuple[float, float]:
    """The worst logits error and the worst gradient error of ``model`` (packed rows) against ``reference``."""
    model.zero_grad()
    with torch.enable_grad() if backward else torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    outputs = [logits[b, start : start + n] for b, start, n in spans]
    logit_error = max(_error(mine, theirs) for mine, theirs in zip(outputs, reference[0]))
    if not backward:
        return logit_error, float("nan")
    probe(torch.cat(outputs).float()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logit_error, max(_error(grads[name], ref) for name, ref in reference[1].items() if ref.abs().max() > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_flex_matches_the_tested_split_path(family, dtype, device):
    """Mistral's window (8) is shorter than the 30- and 48-token documents; Gemma2 has its softcap and alternating
    windows (tests/test_attention.py's configs)."""
    eager = build(family, "eager").to(device)
    ids, positions, spans = (t.to(device) if torch.is_tensor(t) else t for t in packed_inputs())
    reference = eager_per_document(eager, ids, spans)
    split = twin(eager, register_packed_attention("split")).to(device, dtype)
    flex = twin(eager, register_packed_attention("flex")).to(device, dtype)
    backward = device.type == "cuda"
    split_errors = _path_errors(split, ids, positions, spans, reference, backward=True)
    flex_errors = _path_errors(flex, ids, positions, spans, reference, backward=backward)
    floor = FLOOR[dtype]
    assert flex_errors[0] <= 2 * split_errors[0] + floor, ("logits", flex_errors, split_errors)
    if not backward:
        pytest.skip(f"flex logits match (error {flex_errors[0]:.1e}); flex_attention has no backward on {device}")
    assert flex_errors[1] <= 2 * split_errors[1] + floor, ("gradients", flex_errors, split_errors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_matches_the_reference_like_split(family, dtype, device):
    """The two CPU-tested paths on the device: padded's error is at most twice split's plus the floor."""
    from reforge.train.batching import collate

    eager = build(family, "eager").to(device)
    ids, positions, spans = (t.to(device) if torch.is_tensor(t) else t for t in packed_inputs())
    reference = eager_per_document(eager, ids, spans)
    split = twin(eager, register_packed_attention("split")).to(device, dtype)
    split_errors = _path_errors(split, ids, positions, spans, reference, backward=True)
    padded = twin(eager, None).to(device, dtype)
    batch = collate([[ids[b, s : s + n].tolist()] for b, s, n in spans], pad_id=0, padded=True)
    padded.zero_grad()
    logits = padded(
        input_ids=batch.input_ids.to(device),
        position_ids=batch.position_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        use_cache=False,
    ).logits
    outputs = [logits[i, :n] for i, (_, _, n) in enumerate(spans)]
    probe(torch.cat(outputs).float()).backward()
    logit_error = max(_error(mine, theirs) for mine, theirs in zip(outputs, reference[0]))
    grads = {name: p.grad for name, p in padded.named_parameters()}
    grad_error = max(_error(grads[n], ref) for n, ref in reference[1].items() if ref.abs().max() > 0)
    assert logit_error <= 2 * split_errors[0] + FLOOR[dtype], (logit_error, split_errors)
    assert grad_error <= 2 * split_errors[1] + FLOOR[dtype], (grad_error, split_errors)


def test_merge_and_diff_on_the_device_write_the_cpu_bytes(device, tmp_path):
    """`reforge diff` byte for byte; `reforge merge` with a DoRA adapter within one bf16 rounding (the fold's
    matmuls run in another order on cuBLAS)."""
    from conftest import build_model, make_adapter, perturbed_bare, save
    from reforge.io.checkpoint import open_model
    from reforge.ops.diff import diff
    from reforge.ops.merge import merge

    base = build_model("llama-causal")
    retriever = perturbed_bare(copy.deepcopy(base))
    make_adapter(base, tmp_path / "dora", dora=True)
    base_dir = save(base, tmp_path / "base", dtype=torch.bfloat16)
    retriever_dir = save(retriever, tmp_path / "retriever", dtype=torch.bfloat16, shard_size="40KB")
    for tag, where in (("cpu", "cpu"), ("device", str(device))):
        diff(base_dir, retriever_dir, tmp_path / f"diff-{tag}", device=where)
        merge(
            base_dir,
            tmp_path / f"merge-{tag}",
            retriever=retriever_dir,
            adapters=[(tmp_path / "dora", 0.5)],
            device=where,
        )
    cpu_files = sorted((tmp_path / "diff-cpu").glob("*.safetensors"))
    assert cpu_files and [p.read_bytes() for p in cpu_files] == [
        (tmp_path / "diff-device" / p.name).read_bytes() for p in cpu_files
    ]
    cpu, dev = (open_model(tmp_path / f"merge-{tag}").reader() for tag in ("cpu", "device"))
    for name in cpu.keys():
        assert torch.allclose(cpu.get(name).float(), dev.get(name).float(), rtol=2**-7, atol=0), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora_norms_on_the_device_equal_the_cpus(dtype, device):
    """reforge's per-step DoRA norm (`reforge.train.weight_norm`), ||W + s B A|| per row, on cuBLAS and on CPU."""
    from peft import LoraConfig, get_peft_model

    from conftest import build_model
    from reforge.train.weight_norm import step_cached_weight_norm

    base = build_model("llama-causal").to(dtype)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    config.use_dora = True
    norms = {}
    for where in ("cpu", device):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), config).to(where)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # drawn on the CPU: the same values on both devices
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        assert step_cached_weight_norm(model) == 6
        model.train()
        model(input_ids=torch.arange(1, 17, device=where)[None])
        norms[str(where)] = {
            n: m._reforge_norm[3].float().cpu() for n, m in model.named_modules() if hasattr(m, "_reforge_norm")
        }
    cpu, dev = norms["cpu"], norms[str(device)]
    assert len(cpu) == 6 and cpu.keys() == dev.keys()
    for name in cpu:
        tolerance = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(dev[name], cpu[name], rtol=tolerance, atol=0, msg=name)
