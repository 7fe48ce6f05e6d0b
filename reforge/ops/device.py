"""Where the arithmetic of diff, merge and verify runs: on the CPU, or on a CUDA GPU that the pieces stream through.

The arithmetic is the same code on either device (`reforge.ops.merge_compute.compute_output`, `reforge.ops.diff`'s
`_delta_tensor`, with tensors on the device): a piece is read on the CPU (O_DIRECT, as always), copied to the GPU,
computed there in fp32, rounded once to the output dtype there, and the rounded piece comes back for the writer.
Each computing thread has its own `Transfer`: reused pinned host buffers (the copies run asynchronously from them),
reused device buffers, and one CUDA stream per direction besides the one computing, so one thread's copies overlap
the other thread's arithmetic. A tensor that is only copied (a merge's untouched retriever tensors) never goes to
the GPU.

What is the same bit for bit on any IEEE device: every elementwise step (R - W, base + beta * Delta, the DoRA
scaling, R + alpha * Psi, the rounding and its measurement), hence diff and every merge without an adapter. What
is not guaranteed: DoRA's product B @ A (cuBLAS sums the rank in its own order, MKL in another) and its row norms
(a reduction in another order); either may move a result by one rounding. TF32 is off (`torch.backends`), so the
product is a true fp32 one. Not measured on a GPU yet (docs/benchmarks.md).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any

from reforge.errors import InvalidOptionError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | None) -> "torch.device":
    """The device named by ``--device``: ``cpu`` (None), ``cuda`` / ``cuda:N``, or ``auto``: a GPU when there is one.

    The CPU is the default, not ``auto``: the GPU path has not yet run on a GPU (no device was lent to the sessions
    that wrote it), so a user gets it only by asking for it.

    Raises:
        InvalidOptionError: an unknown device, or ``cuda`` on a machine (or torch build) without CUDA.
    """
    import torch

    name = name or "cpu"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise InvalidOptionError(f"--device {name!r} is not a device; use auto, cpu or cuda.", option="--device") from e
    if device.type not in ("cpu", "cuda"):
        raise InvalidOptionError(f"--device {name!r}: diff, merge and verify run on cpu or cuda.", option="--device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(
            f"--device {name!r}: no CUDA device is available here (torch {torch.__version__}"
            f"{', a CPU build' if torch.version.cuda is None else ''}); use --device cpu or auto.",
            option="--device",
        )
    return device


class Transfer:
    """One computing thread's way to a device and back (see the module docstring).

    ``staged=True`` on the CPU runs the same steps with plain buffers and no streams: how the tests check, without
    a GPU, that the device path computes the same function as the CPU path.
    """

    def __init__(self, device: "torch.device", staged: bool = False) -> None:
        import torch

        self.device = device
        self.active = device.type == "cuda" or staged
        cuda = device.type == "cuda"
        self._pin = cuda
        self._streams = [torch.cuda.Stream(device) for _ in range(3)] if cuda else [None] * 3
        self._host: dict[str, torch.Tensor] = {}
        self._on_device: dict[str, torch.Tensor] = {}
        self._factors: tuple[Any, Any] = (None, None)

    def run(self, compute, loaded: Any, host_output) -> tuple["torch.Tensor", float]:
        """``compute(loaded on the device)`` -> ``(output on the device, rounding)``; the output comes back into
        ``host_output(shape)`` (host memory the writer takes)."""
        compute_stream, upload, download = self._streams
        with self._on(compute_stream):
            moved = self._move(loaded, upload, compute_stream)
            output, rounding = compute(moved)  # the rounding (a Python float) waits for the arithmetic
            staging = self._buffer(self._host, "output", output, pinned=self._pin)
            if download is not None:
                download.wait_stream(compute_stream)
            with self._on(download):
                staging.copy_(output, non_blocking=download is not None)
            if download is not None:
                download.synchronize()
        result = host_output(tuple(output.shape))
        result.copy_(staging)
        return result, rounding

    def _move(self, loaded: Any, upload, compute_stream) -> Any:
        """A copy of ``loaded`` (a dataclass of tensors, factors and lists of them) with every tensor on the device;
        factors are moved once per tensor (they are shared by its pieces)."""
        changes = {}
        for field in fields(loaded):
            value = getattr(loaded, field.name)
            changes[field.name] = self._moved_value(field.name, value, upload, compute_stream)
        return replace(loaded, **changes)

    def _moved_value(self, name: str, value: Any, upload, compute_stream) -> Any:
        import torch

        if isinstance(value, torch.Tensor):
            return self._upload(name, value, upload, compute_stream)
        if isinstance(value, list):
            return [self._moved_value(f"{name}.{i}", v, upload, compute_stream) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self._moved_value(f"{name}.{i}", v, upload, compute_stream) for i, v in enumerate(value))
        if is_dataclass(value) and hasattr(value, "add_to"):  # a module's factors: once per tensor
            if self._factors[0] is not value:
                moved = {f: getattr(value, f).to(self.device) for f in ("a", "b") if getattr(value, f) is not None}
                if value.magnitude is not None:
                    moved["magnitude"] = value.magnitude.to(self.device)
                self._factors = (value, replace(value, **moved, _whole=None, _buffers=None))
            return self._factors[1]
        return value

    def _upload(self, name: str, tensor: "torch.Tensor", upload, compute_stream) -> "torch.Tensor":
        """Host tensor -> pinned staging (a memory copy) -> device buffer (asynchronous on the upload stream)."""
        staging = self._buffer(self._host, name, tensor, pinned=self._pin)
        staging.copy_(tensor)
        target = self._buffer(self._on_device, name, tensor, device=self.device)
        with self._on(upload):
            target.copy_(staging, non_blocking=upload is not None)
        if upload is not None:
            compute_stream.wait_stream(upload)
        return target

    @staticmethod
    def _buffer(cache: dict, name: str, like: "torch.Tensor", *, pinned: bool = False, device=None) -> "torch.Tensor":
        """A reused buffer shaped and typed like ``like`` (grown when too small)."""
        import torch

        nbytes = like.numel() * like.element_size()
        buffer = cache.get(name)
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device or "cpu", pin_memory=pinned)
            cache[name] = buffer
        return buffer[:nbytes].view(like.dtype).view(like.shape)

    @staticmethod
    def _on(stream):
        import torch

        return torch.cuda.stream(stream) if stream is not None else nullcontext()


def exact_matmul() -> None:
    """fp32 products in fp32 on a GPU (no TF32), so the device computes the formula the CPU does."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
