"""Writing a checkpoint folder: streamed, size-capped shards, atomic, resumable and locked.

Every tensor's name, dtype and shape is known before the first byte is computed, so each shard's header is written
first and each tensor goes straight to its final offset: memory holds one tensor, never a shard.

Safety, in order of events:
- before anything is written, the output rule (`reforge.io.target.check_output`): never an input, never a folder
  reforge did not write, never a symlink, mount point or unwritable place;
- a lock file beside the output (``.NAME.reforge-lock``, `reforge.io.target.OutputLock`, which train takes too)
  keeps two runs from writing the same output;
- everything is written into ``.NAME.reforge-partial/``; a shard is written as ``*.incomplete`` and renamed to its
  final name only when all its bytes are written, so after a crash or Ctrl-C a shard with its final name is whole.
  With ``durable=True`` each shard is also fsynced before the rename (and the folders after), which keeps that
  promise across a power loss too, at the disk's write speed (183 MB/s here, against page-cache speed without);
  transformers, safetensors and mergekit do not fsync either;
- a rerun with the same plan (same inputs, options and tensor layout: ``plan_id``) keeps the whole shards and
  writes the rest; a different plan starts clean;
- when every shard is whole, the index, ``reforge.json`` and the extra files are added and the folder is renamed
  to NAME. An output that already holds the same plan is left as it is; one that holds anything else needs
  ``overwrite``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reforge import __version__
from reforge.errors import DiskFullError, InvalidOptionError, OutputExistsError, short_path
from reforge.io.buffers import ALIGNMENT
from reforge.io.checkpoint import RECORD_FIELD, file_record, sha256_file
from reforge.io.format import DTYPES, encode_header, open_direct, safetensors_dtype
from reforge.io.manifest import MANIFEST, peek_record
from reforge.io.target import OutputLock, absolute, check_output, commit_staging, staging_path

if TYPE_CHECKING:
    import torch

JOURNAL = "journal.jsonl"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, safetensors dtype (``"BF16"``) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class ShardPlan:
    """Which tensors go into which shard file, in order."""

    shards: tuple[tuple[TensorSpec, ...], ...]
    filenames: tuple[str, ...]

    @classmethod
    def build(cls, specs: list[TensorSpec], max_shard_size: int, weights_name: str = "model") -> "ShardPlan":
        """Fill shards in order, starting a new one when the next tensor would pass ``max_shard_size`` bytes
        (a tensor larger than the cap gets a shard of its own). One shard is named ``{weights_name}.safetensors``,
        several ``{weights_name}-0000i-of-0000N.safetensors`` as transformers names them."""
        if max_shard_size <= 0:
            raise InvalidOptionError("max shard size must be positive.", option="max_shard_size")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise InvalidOptionError("duplicate tensor names in the plan.", option=None)
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        count = len(shards)
        if count == 1:
            filenames = (f"{weights_name}.safetensors",)
        else:
            filenames = tuple(f"{weights_name}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1))
        return cls(tuple(tuple(s) for s in shards), filenames)

    @property
    def total_size(self) -> int:
        return sum(spec.nbytes for shard in self.shards for spec in shard)

    def shard_sizes(self) -> list[int]:
        return [sum(s.nbytes for s in shard) for shard in self.shards]


class _ShardFile:
    """One shard being written: header first, tensors at their offsets, fsync and rename when all are in."""

    def __init__(
        self,
        directory: Path,
        filename: str,
        specs: tuple[TensorSpec, ...],
        metadata: dict[str, str],
        durable: bool = False,
    ):
        self.durable = durable
        self.final = directory / filename
        self.partial = directory / (filename + ".incomplete")
        self.header, offsets = encode_header([(s.name, s.dtype, s.shape) for s in specs], metadata)
        self.offsets = {s.name: o for s, o in zip(specs, offsets)}
        self.size = len(self.header) + sum(s.nbytes for s in specs)
        self.pending = {s.name for s in specs}
        self.remaining = {s.name: s.nbytes for s in specs}  # bytes not yet written (tensors come in pieces)
        self.fd: int | None = None
        self.direct_fd: int | None = None
        # the file's SHA-256, fed with the bytes as they are written while they come in file order (the usual case);
        # what came out of order is read back once at the end. ``record`` is its `file_record` once renamed.
        self.digest = hashlib.sha256(self.header)
        self.hashed_to = len(self.header)
        self.record: dict | None = None

    def is_whole(self) -> bool:
        """A finished shard from an earlier run: final name, right size, identical header."""
        if not self.final.is_file() or self.final.stat().st_size != self.size:
            return False
        with self.final.open("rb") as handle:
            return handle.read(len(self.header)) == self.header

    def open(self) -> None:
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(self.fd, 0, self.size)  # fail now, not halfway, when the disk is too small
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        _pwrite_all(self.fd, self.header, 0)
        self.direct_fd = open_direct(self.partial, os.O_WRONLY)

    def write(self, name: str, data: memoryview, address: int, at: int = 0) -> None:
        """Write bytes of one tensor (``data``, at memory ``address``) ``at`` bytes into its place; the tensor is
        done when all its bytes are written."""
        if self.fd is None:
            self.open()
        assert self.fd is not None
        _pwrite_tensor(self.fd, self.direct_fd, data, self.offsets[name] + at, address)
        if self.offsets[name] + at == self.hashed_to:
            self.digest.update(data.cast("B"))
            self.hashed_to += len(data.cast("B"))
        self.remaining[name] -= len(data.cast("B"))
        if self.remaining[name] <= 0:
            self.pending.discard(name)
        if not self.pending:
            self.finish()

    def finish(self) -> None:
        assert self.fd is not None
        os.ftruncate(self.fd, self.size)
        for at in range(self.hashed_to, self.size, 1 << 22):  # pieces written out of order: read back once
            self.digest.update(os.pread(self.fd, min(1 << 22, self.size - at), at))
        self.hashed_to = self.size
        if self.durable:
            os.fsync(self.fd)
        self.abandon()
        os.replace(self.partial, self.final)
        self.record = file_record(self.final, self.digest.hexdigest())

    def hash_record(self) -> dict:
        """``{sha256, size, mtime_ns}`` of the finished shard (read once for a shard kept from an earlier run)."""
        if self.record is None:
            self.record = file_record(self.final, sha256_file(self.final))
        return self.record

    def abandon(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None


def _pwrite_tensor(fd: int, direct_fd: int | None, data: memoryview, offset: int, address: int) -> None:
    """Write a tensor's bytes at ``offset``: its whole 4 KiB blocks with O_DIRECT when its memory lies at the same
    position within a block as its place in the file (see `CheckpointWriter.alignment`), the rest through the page
    cache.

    Why O_DIRECT: a write into the page cache copies every byte into freshly allocated pages. On the 2-core machine
    of docs/benchmarks.md that copy took 0.2 to 2.7 s of CPU per GB (page allocation and reclaim), competing with
    the arithmetic; an O_DIRECT write of the same GB took 0.55-0.7 s of the disk and 0.1 s of CPU. The partial
    blocks at either end (shared with the neighbouring tensors) go through the page cache, which merges them.
    """
    data = data.cast("B")
    head = -offset % ALIGNMENT
    body = max(len(data) - head, 0) // ALIGNMENT * ALIGNMENT
    if direct_fd is not None and body and (address + head) % ALIGNMENT == 0:
        try:
            _pwrite_all(direct_fd, data[head : head + body], offset + head)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: O_DIRECT refused after all; the page cache writes it below
                raise
        else:
            _pwrite_all(fd, data[:head], offset)
            _pwrite_all(fd, data[head + body :], offset + head + body)
            return
    _pwrite_all(fd, data, offset)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class CheckpointWriter:
    """Write a sharded safetensors checkpoint folder atomically; see the module docstring.

    Example:
        >>> specs = [TensorSpec("w", "F32", (2, 2))]
        >>> with CheckpointWriter(out, specs, plan_id="demo") as writer:        # doctest: +SKIP
        ...     writer.write("w", torch.zeros(2, 2))
        ...     writer.add_file("config.json", "{}")

    Args:
        output: the folder to produce.
        specs: every tensor, in the order they should be laid out.
        plan_id: identifies inputs + options; an output or partial folder with the same id is reused.
        max_shard_size: bytes per shard file (a tensor larger than this gets its own shard).
        manifest: JSON-able provenance saved as ``reforge.json`` (``plan_id`` and version are added).
        overwrite: replace an output folder that holds something else.
        progress: ``progress(bytes_done, bytes_total)``.
        durable: fsync every file before it is renamed (survives power loss; slower).
        inputs: the command's input paths; an output that is, contains or lies inside one is refused
            (`reforge.io.target.check_output`, which also refuses replacing anything reforge did not write).
    """

    def __init__(
        self,
        output: str | Path,
        specs: list[TensorSpec],
        *,
        plan_id: str,
        max_shard_size: int = 5 * 10**9,
        manifest: dict | None = None,
        overwrite: bool = False,
        weights_name: str = "model",
        progress: Callable[[int, int | None], None] | None = None,
        durable: bool = False,
        inputs: list[str | Path | None] | tuple = (),
    ) -> None:
        self.durable = durable
        self.output = Path(output)
        self.plan = ShardPlan.build(specs, max_shard_size, weights_name)
        self.plan_id = plan_id
        self.weights_name = weights_name
        self.manifest = {"reforge_version": __version__, "plan_id": plan_id, **(manifest or {})}
        self.overwrite = overwrite
        self.progress = progress
        self.inputs = list(inputs)
        self._target = absolute(output)  # for the file system: "-o ." has a name here
        self.staging = staging_path(self._target)
        self._lock = OutputLock(self._target)
        self.lock_path = self._lock.path
        self.already_complete = False
        self.resumed_shards = 0
        self._files: dict[str, bytes] = {}
        self.records: dict[str, dict] = {}
        self._specs = {s.name: s for s in specs}
        self._shard_of: dict[str, _ShardFile] = {}
        self._shards: list[_ShardFile] = []
        self._done_bytes = 0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._queued: dict[str, int] = {}  # bytes handed to the writer thread, per tensor
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        check_output(self.output, inputs=self.inputs, overwrite=self.overwrite)
        self._lock.acquire()
        try:
            self._prepare()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._drain()
            error, self._error = self._error, None
            for shard in self._shards:
                shard.abandon()
            if error is not None and exc_type is None:
                raise error
            if exc_type is None and not self.already_complete:
                self._commit()
        finally:
            self._lock.release()

    def pending(self, name: str) -> bool:
        """Whether ``name`` still has to be written (False when its shard survived from an earlier run)."""
        return (
            not self.already_complete
            and name in self._shard_of
            and self._queued.get(name, -1) < self._specs[name].nbytes  # -1: nothing queued yet (0-byte tensors)
            and name in self._shard_of[name].pending
        )

    def write(self, name: str, tensor: "torch.Tensor", rows: slice | None = None) -> None:
        """Write one tensor, which must have the planned dtype and shape; or, with ``rows`` (a slice of its first
        dimension), those rows of it: a large tensor can be written piece by piece, in any order, each piece once."""
        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name!r} is not in the plan")
        shape, at = spec.shape, 0
        if rows is not None and spec.shape:
            start, stop, _ = rows.indices(spec.shape[0])
            shape = (max(stop - start, 0), *spec.shape[1:])
            at = start * (spec.nbytes // spec.shape[0] if spec.shape[0] else 0)
        if safetensors_dtype(tensor.dtype) != spec.dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {shape}")
        if not self.pending(name):
            return
        import torch

        self._raise_background_error()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._queued[name] = self._queued.get(name, 0) + data.nbytes
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_queued, name="reforge-writer", daemon=True)
            self._thread.start()
        self._queue.put((name, data, at))

    def _write_queued(self) -> None:
        """The writer thread: pwrite releases the GIL, so writing overlaps with computing the next tensor."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure; the error is raised in the caller's thread
            name, data, at = item
            try:
                self._shard_of[name].write(name, memoryview(data), data.ctypes.data, at)
                self._advance(data.nbytes)
            except OSError as e:
                self._error = self._disk_error(e, self._shard_of[name].partial)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            del item, data  # let go of the tensor now, not at the next get: its memory may be pooled for reuse

    def _drain(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def alignment(self, name: str, rows: slice | None = None) -> int:
        """Where tensor ``name`` (or its rows ``rows``) starts within a 4 KiB block of its file. A tensor whose
        memory starts at the same position within a page (``reforge.ops.stream.Accumulator`` places its output so)
        is written with O_DIRECT, without copying it into the page cache."""
        shard = self._shard_of.get(name)
        if shard is None:
            return 0
        spec = self._specs[name]
        start = rows.indices(spec.shape[0])[0] if rows is not None and spec.shape else 0
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
        return (shard.offsets[name] + start * row_bytes) % ALIGNMENT

    def record(self, name: str, facts: dict) -> None:
        """Keep JSON-able facts about a written tensor (e.g. its rounding error). They are journaled in the
        partial folder, so a resumed run still has the facts of the shards it kept; see `records`."""
        self.records[name] = facts
        with (self.staging / JOURNAL).open("a") as handle:
            handle.write(json.dumps({"name": name, "facts": facts}) + "\n")

    def add_file(self, name: str, content: str | bytes) -> None:
        """Add a small file (config.json, README.md, tokenizer files) to the output."""
        self._files[name] = content.encode() if isinstance(content, str) else content

    # -- internals ---------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        if self._output_matches_plan():
            self.already_complete = True
            self.records = peek_record(self._target).get("records", {})
            return
        if self._target.exists() and not self.overwrite and any(self._target.iterdir()):
            raise OutputExistsError(
                f"{short_path(self.output)} already holds something else.",
                hint="Choose another --output, or pass --overwrite to replace it.",
                path=self.output,
            )
        staged_plan = peek_record(self.staging).get("plan_id")
        if self.staging.exists() and staged_plan != self.plan_id:
            shutil.rmtree(self.staging)
        self.staging.mkdir(exist_ok=True)
        (self.staging / MANIFEST).write_text(json.dumps({"plan_id": self.plan_id, "state": "partial"}))
        metadata = {"format": "pt", "reforge_version": __version__, "reforge_plan_id": self.plan_id}
        for filename, specs in zip(self.plan.filenames, self.plan.shards):
            shard = _ShardFile(self.staging, filename, specs, metadata, self.durable)
            if shard.is_whole():
                shard.pending.clear()
                self.resumed_shards += 1
                self._done_bytes += shard.size - len(shard.header)
            for spec in specs:
                self._shard_of[spec.name] = shard
            self._shards.append(shard)
        self._load_journal()
        try:
            self._check_space()
        except DiskFullError:
            if not self.resumed_shards:  # nothing worth keeping: leave no partial folder behind the refusal
                shutil.rmtree(self.staging, ignore_errors=True)
            raise
        self._advance(0)

    def _load_journal(self) -> None:
        """Facts recorded for tensors in the shards kept from an earlier run; the rest are dropped."""
        journal = self.staging / JOURNAL
        kept: dict[str, dict] = {}
        if journal.is_file():
            for line in journal.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the crash
                shard = self._shard_of.get(entry.get("name"))
                if shard is not None and not shard.pending:
                    kept[entry["name"]] = entry["facts"]
        self.records = kept
        journal.write_text("".join(json.dumps({"name": k, "facts": v}) + "\n" for k, v in kept.items()))

    def _output_matches_plan(self) -> bool:
        manifest = peek_record(self._target)
        if manifest.get("plan_id") != self.plan_id:
            return False
        return all((self._target / name).is_file() for name in self.plan.filenames)

    def _check_space(self) -> None:
        needed = sum(s.size for s in self._shards if s.pending)
        free = shutil.disk_usage(self.staging).free
        if needed > free:
            raise DiskFullError(
                f"writing {short_path(self.output)} needs {needed / 1e9:.2f} GB more, but only "
                f"{free / 1e9:.2f} GB are free.",
                hint="Free some space or choose another --output.",
                path=self.output,
                needed=needed,
                free=free,
            )

    def _disk_error(self, error: OSError, path: Path) -> Exception:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return DiskFullError(
                f"the disk filled up while writing {short_path(path)}.",
                hint="Free some space and rerun the same command: whole shards are kept.",
                path=path,
                needed=None,
                free=None,
            )
        return error

    def _advance(self, nbytes: int) -> None:
        self._done_bytes += nbytes
        if self.progress:
            self.progress(self._done_bytes, self.plan.total_size)

    def _commit(self) -> None:
        missing = [name for shard in self._shards for name in sorted(shard.pending)]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[0]!r}")
        try:
            self._write_small_files()
        except OSError as e:
            raise self._disk_error(e, self.staging) from e
        commit_staging(self.staging, self._target, durable=self.durable)

    def _write_small_files(self) -> None:
        if len(self.plan.filenames) > 1:
            weight_map = {
                spec.name: filename for filename, specs in zip(self.plan.filenames, self.plan.shards) for spec in specs
            }
            index = {
                "metadata": {
                    "total_size": self.plan.total_size,
                    "reforge_version": __version__,
                    "reforge_plan_id": self.plan_id,
                },
                "weight_map": weight_map,
            }
            self._files[f"{self.weights_name}.safetensors.index.json"] = json.dumps(index, indent=2).encode()
        self._files[MANIFEST] = json.dumps(
            {
                **self.manifest,
                "state": "complete",
                "files": list(self.plan.filenames),
                "total_size": self.plan.total_size,
                "records": self.records,
                RECORD_FIELD: {s.final.name: s.hash_record() for s in self._shards if s.final.is_file()},
            },
            indent=2,
            default=str,
        ).encode()
        (self.staging / JOURNAL).unlink(missing_ok=True)
        for name, content in self._files.items():
            target = self.staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".incomplete")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _pwrite_all(fd, content, 0)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)


def plan_id_for(parts: dict) -> str:
    """A stable id for a write plan from the JSON-able facts that determine its bytes."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
