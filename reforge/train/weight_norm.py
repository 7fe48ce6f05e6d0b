"""DoRA's weight norm once per optimizer step instead of once per forward pass, from ``B @ A`` directly.

peft's DoRA layer recomputes, in every training forward pass of every adapted matrix, ``||W + s B A||`` (row-wise):
it forms ``B A`` by pushing an ``in x in`` identity matrix through ``A`` and ``B`` (an FSDP workaround), adds it to
``W`` and takes the norm, reading every adapted weight. The norm is detached (DoRA section 4.3), so it is a constant
between optimizer steps: with several forward passes per step (gradient accumulation, or reforge's CPU forward
groups of one row each) all but the first recompute the same numbers. `step_cached_weight_norm` gives each DoRA
layer a ``B A`` computed as one small matmul and a norm kept until ``A``, ``B`` or ``W`` change (their version
counters, which every in-place optimizer update and checkpoint load bumps). Same values: ``B A`` is the same sum of
the same products (a different summation order at most), and a cached norm is the one that would be recomputed.

reforge trains with DDP only; peft's identity-matrix route exists for FSDP, which reforge does not support.
bench/bench_gpu.py ``--measure dora`` measures the share of a step the norm takes (docs/benchmarks.md).
"""

from __future__ import annotations

from types import MethodType


def step_cached_weight_norm(model) -> int:
    """Give every peft ``DoraLinearLayer`` in ``model`` the direct ``B A`` and the per-step norm cache; return how
    many layers were changed (0 when peft's DoRA layer is not the one this was written against)."""
    try:
        from peft.tuners.lora.dora import DoraLinearLayer
    except ImportError:
        return 0
    if not all(hasattr(DoraLinearLayer, name) for name in ("get_lora_weight", "get_weight_norm")):
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is DoraLinearLayer:  # not the embedding or convolution subclasses
            module.get_lora_weight = MethodType(_lora_weight(module.get_lora_weight), module)
            module.get_weight_norm = MethodType(_weight_norm(module.get_weight_norm), module)
            changed += 1
    return changed


def _versions(*tensors) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


def _lora_weight(original):
    def lora_weight(self, lora_A, lora_B, adapter_name=None):
        """``B A`` (``(out, in)``, detached: peft's forward reads it only through the detached norm), or an empty
        placeholder when the cached norm is still current and ``B A`` would not be read."""
        import torch

        if getattr(lora_B, "bias", None) is not None:  # lora_bias: peft's route adds it, B @ A would not
            self._reforge_adapter = None
            return original(lora_A, lora_B, adapter_name=adapter_name)
        self._reforge_adapter = (lora_A, lora_B)
        cached = getattr(self, "_reforge_norm", None)
        if adapter_name is not None and cached is not None and cached[0] == _versions(lora_A.weight, lora_B.weight):
            return lora_B.weight.new_empty(0)
        with torch.no_grad():
            return lora_B.weight @ lora_A.weight

    return lora_weight


def _weight_norm(original):
    def weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        adapter = getattr(self, "_reforge_adapter", None)
        if adapter_name is None or adapter is None:  # peft's own calls at set-up and merge time: untouched
            return original(weight, lora_weight, scaling, adapter_name=adapter_name)
        key = (_versions(adapter[0].weight, adapter[1].weight), _versions(weight), scaling)
        cached = getattr(self, "_reforge_norm", None)
        if cached is not None and cached[:3] == key:
            return cached[3]
        if lora_weight.numel() == 0:  # the placeholder, but W changed since: form B A after all
            import torch

            with torch.no_grad():
                lora_weight = (adapter[1].weight @ adapter[0].weight).to(weight.dtype)
        norm = original(weight, lora_weight, scaling).detach()
        self._reforge_norm = (*key, norm)
        return norm

    return weight_norm
