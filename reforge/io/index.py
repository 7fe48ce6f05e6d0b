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

    ``pickle_files`` is non-empty only for a pickle checkpoint opened with ``allow_pickle``; its ``tensors`` are
    real (names, dtypes, shapes) but their offsets are not byte ranges: `reforge.io.reader.ShardReader` loads them.
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
            _add_tensors(tensors, read_header(file)[0], file)
        return cls(directory, tensors, metadata or {}, tuple(files))

    @classmethod
    def _from_index_file(cls, index_file: Path) -> "ShardIndex":
        directory = index_file.parent
        inside_checkpoint(directory, index_file, what="index")
        weight_map, metadata = read_weight_map(index_file)
        files = _named_files(directory, weight_map, index_file)
        result = cls.from_files(directory, files, metadata)
        _check_weight_map(result.tensors, weight_map, directory, index_file)
        return result

    @classmethod
    def _pickle_or_fail(cls, directory: Path, names: list[str], allow_pickle: bool) -> "ShardIndex":
        for name in names:
            pickle_name = PICKLE_NAMES.get(name)
            if pickle_name is None:
                continue
            index_file = directory / f"{pickle_name}.index.json"
            if index_file.is_file():
                weight_map, metadata = read_weight_map(index_file)
                files = _named_files(directory, weight_map, index_file)
            elif (directory / pickle_name).is_file():
                weight_map, metadata, files = None, {}, [directory / pickle_name]
            else:
                continue
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{short_path(files[0])} is a pickle checkpoint, which can run code when loaded.",
                    hint="Pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True), "
                    "or convert it to safetensors.",
                    path=files[0],
                )
            return cls._from_pickles(directory, files, metadata, weight_map, index_file)
        wanted = " or ".join(f"{n}.safetensors" for n in names)
        raise CheckpointNotFoundError(
            f"{short_path(directory)} holds no {wanted} (nor an index of shards).", ref=str(directory)
        )

    @classmethod
    def _from_pickles(
        cls, directory: Path, files: list[Path], metadata: dict, weight_map: dict | None, index_file: Path
    ) -> "ShardIndex":
        """A pickle checkpoint's real tensor map, so every rule that holds for safetensors holds for it too."""
        from reforge.io.pickled import tensor_infos

        tensors: dict[str, TensorInfo] = {}
        for file in files:
            inside_checkpoint(directory, file, what="pickle file")
            _add_tensors(tensors, tensor_infos(file), file)
        if weight_map is not None:
            _check_weight_map(tensors, weight_map, directory, index_file)
        return cls(directory, tensors, metadata, tuple(files), tuple(files))


def _add_tensors(tensors: dict[str, TensorInfo], found: dict[str, TensorInfo], file: Path) -> None:
    """Add one file's tensors to ``tensors``; a name held by two files is a corrupt checkpoint."""
    for name, info in found.items():
        if name in tensors:
            raise CorruptCheckpointError(
                f"{short_path(file)}: tensor {name!r} also appears in {short_path(tensors[name].file)}.",
                path=file,
                tensor=name,
                reason="duplicate tensor",
            )
        tensors[name] = info


def read_weight_map(index_file: Path) -> tuple[dict[str, str], dict]:
    """``(weight_map, metadata)`` of a ``*.index.json`` file: a non-empty map of tensor name -> file name.

    Raises:
        CorruptCheckpointError: not JSON, no ``weight_map`` object, an empty one, or names/values that are not
            strings.
    """
    try:
        index = json.loads(index_file.read_text())
        if not isinstance(index, dict):
            raise TypeError("the file is not a JSON object")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        if not weight_map:
            raise ValueError("weight_map names no tensors")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise TypeError(f"weight_map entry {bad!r} is {weight_map[bad]!r}, not a file name")
        metadata = index.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise TypeError("metadata is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        reason = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise CorruptCheckpointError(
            f"{short_path(index_file)} is not a valid index ({reason}).",
            path=index_file,
            tensor=None,
            reason=reason,
        ) from e
    return weight_map, metadata


def _named_files(directory: Path, weight_map: dict[str, str], index_file: Path) -> list[Path]:
    files = [safe_child(directory, name, index_file) for name in dict.fromkeys(weight_map.values())]
    for file in files:
        if not file.exists():  # a FIFO or a folder by that name is refused by inside_checkpoint, not called missing
            raise ShardNotFoundError(
                f"{short_path(file)} is named by {short_path(index_file)} but missing.",
                hint="Download or copy the missing shard, then rerun.",
                path=file,
                index=index_file,
            )
    return files


def _check_weight_map(
    tensors: dict[str, TensorInfo], weight_map: dict[str, str], directory: Path, index_file: Path
) -> None:
    for name, filename in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file != safe_child(directory, filename, index_file):
            raise CorruptCheckpointError(
                f"{short_path(index_file)} says tensor {name!r} is in {filename}, but that file does not hold it.",
                path=index_file,
                tensor=name,
                reason="index and shard disagree",
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
