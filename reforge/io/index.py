"""Which tensor lives in which file of a checkpoint folder.

`ShardIndex.from_dir` understands a single ``model.safetensors``, a sharded checkpoint with
``model.safetensors.index.json``, a peft ``adapter_model.safetensors``, and (only when allowed) their pickle
equivalents. Every file an index names must stay inside the folder and exist; every header is validated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from reforge.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    PickleRefusedError,
    ShardNotFoundError,
    UnsafePathError,
    short_path,
)
from reforge.io.format import TensorInfo, read_header
from reforge.io.paths import inside_checkpoint

SAFETENSORS_NAMES = ("model", "adapter_model", "diffusion_pytorch_model")
PICKLE_NAMES = {"model": "pytorch_model.bin", "adapter_model": "adapter_model.bin"}


@dataclass(frozen=True)
class ShardIndex:
    """The tensors of one checkpoint folder: name -> TensorInfo, plus the index metadata.

    ``pickle_files`` is non-empty only for a pickle checkpoint opened with ``allow_pickle``; then ``tensors``
    is empty until `reforge.io.reader.ShardReader` loads them.
    """

    directory: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, object] = field(default_factory=dict)
    files: tuple[Path, ...] = ()
    pickle_files: tuple[Path, ...] = ()

    @classmethod
    def from_dir(
        cls, directory: str | Path, *, weights_name: str | None = None, allow_pickle: bool = False
    ) -> "ShardIndex":
        """Index the checkpoint in ``directory``.

        Args:
            directory: a checkpoint folder.
            weights_name: ``"model"`` or ``"adapter_model"``; by default whichever the folder has.
            allow_pickle: accept ``pytorch_model.bin`` / ``adapter_model.bin`` when no safetensors exist.

        Raises:
            CheckpointNotFoundError, ShardNotFoundError, UnsafePathError, CorruptCheckpointError, PickleRefusedError.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointNotFoundError(f"{short_path(directory)} is not a folder.", ref=str(directory))
        names = [weights_name] if weights_name else list(SAFETENSORS_NAMES)
        for name in names:
            index_file = directory / f"{name}.safetensors.index.json"
            if index_file.is_file():
                return cls._from_index_file(index_file)
            single = directory / f"{name}.safetensors"
            if single.exists():  # a FIFO or a folder by that name is refused in from_files, not skipped
                return cls.from_files(directory, [single])
        return cls._pickle_or_fail(directory, names, allow_pickle)

    @classmethod
    def from_files(cls, directory: Path, files: list[Path], metadata: dict | None = None) -> "ShardIndex":
        """Index the given safetensors files (already checked to be inside ``directory``)."""
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            inside_checkpoint(directory, file, what="shard")
            found, _ = read_header(file)
            for name, info in found.items():
                if name in tensors:
                    raise CorruptCheckpointError(
                        f"{short_path(file)}: tensor {name!r} also appears in {short_path(tensors[name].file)}.",
                        path=file,
                        tensor=name,
                        reason="duplicate tensor",
                    )
                tensors[name] = info
        return cls(directory, tensors, metadata or {}, tuple(files))

    @classmethod
    def _from_index_file(cls, index_file: Path) -> "ShardIndex":
        directory = index_file.parent
        inside_checkpoint(directory, index_file, what="index")
        try:
            index = json.loads(index_file.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(
                f"{short_path(index_file)} is not a valid index ({e}).", path=index_file, tensor=None, reason=str(e)
            ) from e
        files = [safe_child(directory, name, index_file) for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.exists():
                raise ShardNotFoundError(
                    f"{short_path(file)} is named by {short_path(index_file)} but missing.",
                    hint="Download or copy the missing shard, then rerun.",
                    path=file,
                    index=index_file,
                )
        result = cls.from_files(directory, files, index.get("metadata") or {})
        for name, filename in weight_map.items():
            info = result.tensors.get(name)
            if info is None or info.file != safe_child(directory, filename, index_file):
                raise CorruptCheckpointError(
                    f"{short_path(index_file)} says tensor {name!r} is in {filename}, but that file's header "
                    "does not hold it.",
                    path=index_file,
                    tensor=name,
                    reason="index and shard disagree",
                )
        return result

    @classmethod
    def _pickle_or_fail(cls, directory: Path, names: list[str], allow_pickle: bool) -> "ShardIndex":
        for name in names:
            pickle_name = PICKLE_NAMES.get(name)
            if pickle_name is None:
                continue
            index_file = directory / f"{pickle_name}.index.json"
            if index_file.is_file():
                weight_map = json.loads(index_file.read_text()).get("weight_map", {})
                files = [safe_child(directory, f, index_file) for f in dict.fromkeys(weight_map.values())]
            elif (directory / pickle_name).is_file():
                files = [directory / pickle_name]
            else:
                continue
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{short_path(files[0])} is a pickle checkpoint, which can run code when loaded.",
                    hint="Pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True), "
                    "or convert it to safetensors.",
                    path=files[0],
                )
            return cls(directory, {}, {}, tuple(files), tuple(files))
        wanted = " or ".join(f"{n}.safetensors" for n in names)
        raise CheckpointNotFoundError(
            f"{short_path(directory)} holds no {wanted} (nor an index of shards).", ref=str(directory)
        )


def safe_child(directory: Path, name: str, index_file: Path) -> Path:
    """``directory / name``, refusing names that are absolute or climb out of ``directory``."""
    # Checked on the name, not the resolved path: Hub cache snapshots are symlinks into a blobs folder.
    normalized = os.path.normpath(name)
    if os.path.isabs(name) or normalized == ".." or normalized.startswith(".." + os.sep):
        raise UnsafePathError(
            f"{short_path(index_file)} names {name!r}, which is outside the checkpoint folder.",
            hint="Refusing to read it; the index file may be malicious.",
            index=index_file,
            entry=name,
        )
    return directory / normalized
