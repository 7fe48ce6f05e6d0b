"""The Delta checkpoint format: what `reforge diff` writes and `merge`/`verify` read.

A delta folder is an ordinary safetensors checkpoint (single file or shards + index) in the retriever's bare-model
key layout, plus ``reforge.json`` (``kind: "delta"``, the provenance of base and retriever, the stored dtype and
the rounding each tensor suffered). A tensor is stored either dense under its own name, or factored (``--low-rank``,
``--rank``, ``--energy``) as two tensors ``<module>.lora_A.weight`` (r, in) and ``<module>.lora_B.weight`` (out, r)
with Delta = B @ A exactly (no scale). Tensors the manifest lists under ``zero`` are omitted and are zero.
The retriever's config, tokenizer and sentence-transformers files are kept under ``retriever/``, so
`reforge merge --delta` can write the retriever's layout without the retriever at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reforge.errors import CorruptCheckpointError, ProvenanceMismatchError, short_path
from reforge.io.buffers import BufferPool
from reforge.io.index import ShardIndex
from reforge.io.manifest import read_manifest
from reforge.io.paths import located_inputs
from reforge.io.reader import ShardReader

if TYPE_CHECKING:
    import torch

FACTOR_A, FACTOR_B = ".lora_A.weight", ".lora_B.weight"
# The retriever's config, tokenizer and sentence-transformers files, kept in a subfolder so that the delta folder
# itself never loads as a model by accident.
RETRIEVER_FILES = "retriever"


def factor_keys(key: str) -> tuple[str, str]:
    """The stored names of the two factors of canonical tensor ``key`` (``x.weight`` -> ``x.lora_A.weight``)."""
    stem = key.removesuffix(".weight")
    return stem + FACTOR_A, stem + FACTOR_B


@dataclass
class DeltaCheckpoint:
    """A delta folder opened for lazy reading. ``shapes`` maps every canonical key (dense, factored or zero)."""

    path: Path
    manifest: dict
    index: ShardIndex

    @classmethod
    def open(cls, path: str | Path) -> "DeltaCheckpoint":
        """Open a folder written by `reforge diff`.

        Raises:
            CorruptCheckpointError: no ``reforge.json`` of kind ``delta``, or it disagrees with the tensors.
        """
        path = Path(path)
        record = read_manifest(path)
        if record is None:
            raise CorruptCheckpointError(
                f"{short_path(path)} has no reforge.json, so it is not a delta written by `reforge diff`.",
                path=path,
                tensor=None,
                reason="no reforge.json",
            )
        manifest = record.data
        if record.kind != "delta" or not record.complete:
            raise CorruptCheckpointError(
                f"{short_path(path)}/reforge.json is not a complete delta (kind={manifest.get('kind')!r}).",
                path=path,
                tensor=None,
                reason="not a delta",
            )
        return cls(path, located_inputs(manifest, path), ShardIndex.from_dir(path))  # its inputs' paths, absolute

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.manifest["shapes"].items()}

    @property
    def factored(self) -> set[str]:
        return set(self.manifest.get("factored", []))

    @property
    def zero(self) -> set[str]:
        return set(self.manifest.get("zero", []))

    def reader(self, pool: BufferPool | None = None) -> ShardReader:
        """A fresh lazy reader over the delta's files; large tensors take their memory from ``pool``."""
        return ShardReader(self.index, pool)

    def get(self, reader: ShardReader, key: str) -> "torch.Tensor":
        """Delta for canonical ``key`` in fp32 (materialized from factors, or zeros)."""
        import torch

        if key in self.zero:
            return torch.zeros(self.shapes[key], dtype=torch.float32)
        if key in self.factored:
            a_key, b_key = factor_keys(key)
            return reader.get(b_key).float() @ reader.get(a_key).float()
        return reader.get(key).float()

    def check_base(self, base_provenance: dict) -> None:
        """Refuse a base other than the one this delta was computed from (compared by content fingerprint)."""
        recorded = (self.manifest.get("base") or {}).get("fingerprint")
        found = base_provenance.get("fingerprint")
        if recorded and found and recorded != found:
            raise ProvenanceMismatchError(
                f"{short_path(self.path)} was computed from base {self.manifest['base'].get('ref')!r} "
                f"(fingerprint {recorded}), but the base given is {base_provenance.get('ref')!r} "
                f"(fingerprint {found}).",
                hint="Pass the same base, or recompute the delta with `reforge diff`.",
                path=self.path,
                expected=recorded,
                found=found,
            )
