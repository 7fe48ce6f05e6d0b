"""Publishing a finished checkpoint folder to the Hugging Face Hub: check it, verify it, upload it in one commit.

`push_folder` refuses a folder that is incomplete (`check_folder`: leftovers, locks, unfinished rewrites, headers
and index) or that fails `reforge.ops.verify`, then runs `create_repo(exist_ok=True)` and `upload_folder`. A rerun
is safe: files already on the Hub with the same content are skipped by huggingface_hub, and a commit is all or
nothing. This module sits above ops because it verifies; downloading lives below, in `reforge.io.hub`.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path, PurePosixPath

from reforge.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    HubError,
    UnsafePathError,
    VerificationError,
    find_secret,
    mask_secrets,
    short_path,
)
from reforge.io.format import TensorInfo, read_header
from reforge.io.http import bounded, retrying
from reforge.io.hub import _hub_errors, _offline, _with_revision, hub_endpoint, shard_names
from reforge.io.index import read_weight_map
from reforge.io.manifest import read_manifest
from reforge.io.progress import ProgressFn
from reforge.io.target import lock_path, staging_path

# Names that mean a writer did not finish (temporary files, partial downloads, locks).
_LEFTOVER_PATTERNS = (
    "*.tmp",
    "*.tmp.*",
    "*.tmp-*",
    ".tmp*",
    "tmp*.safetensors",
    "*.partial",
    "*.partial.*",
    "*.incomplete",
    "*.lock",
    "*.part",
    "*~",
)
_UPLOAD_IGNORE = (
    ".git",
    ".git/*",
    "*/.git",
    "**/.git/**",
    ".cache/huggingface",
    ".cache/huggingface/*",
    "*/.cache/huggingface",
    "**/.cache/huggingface/**",
)


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """The ``(repo path, bytes)`` pairs `push_folder` would upload, sorted (what ``--dry-run`` prints)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    kept = filter_repo_objects(sorted(files), ignore_patterns=list(_UPLOAD_IGNORE))
    return [(name, files[name]) for name in kept]


def check_folder(folder: str | Path) -> list[str]:
    """Cheap completeness checks on a checkpoint folder before upload; returns the failures (empty when fine).

    Checks: it is a folder with no leftover temporary, partial or lock files, no symlink leading out of it (its
    target would be uploaded), no reforge run writing it now
    (``.NAME.reforge-lock`` held) and no unfinished rewrite beside it (``.NAME.reforge-partial``); its
    ``reforge.json``, if any, says ``complete``; it holds
    safetensors weights with their config; every index entry is safe, names an existing shard that holds the
    tensor, and no shard is left outside the index; every safetensors header is whole (offsets inside the file).
    Reads only file headers.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{short_path(folder)} is not a folder"]
    failures = []
    if _is_leftover(folder.name):
        failures.append(f"{folder.name} looks like a temporary output folder (the run that wrote it did not finish)")
    failures += _sibling_failures(folder)
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if _is_leftover(path.name) and not rel.startswith((".git/", ".cache/")):
            failures.append(f"{rel} is a leftover temporary, partial or lock file")
        if path.is_symlink() and root not in path.resolve().parents:  # its target would be uploaded
            failures.append(f"{rel} is a symlink to {path.resolve()}, outside the folder")
    failures += _manifest_failures(folder)
    headers: dict[str, dict[str, TensorInfo]] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        rel = path.relative_to(folder).as_posix()
        header, problem = _safetensors_header(path)
        if problem:
            failures.append(f"{rel}: {problem}")
        else:
            headers[rel] = header
    failures += _check_weights(folder, headers)
    return failures


def _sibling_failures(folder: Path) -> list[str]:
    """A reforge run writing this folder right now (its lock is held), or a half-written replacement next to it."""
    failures = []
    for lock in (lock_path(folder), folder.with_name(f"{folder.name}.lock")):
        if lock.is_file() and _lock_is_held(lock):
            failures.append(f"another run is writing this folder right now (it holds {short_path(lock)})")
    partial = staging_path(folder)
    if partial.exists():
        failures.append(
            f"{short_path(partial)} holds an unfinished rewrite of this folder: rerun the command that "
            "wrote it to finish, or delete the partial folder"
        )
    return failures


def _lock_is_held(lock: Path) -> bool:
    """Whether a process holds an exclusive flock on ``lock`` (a stale lock file left by a crash is not held)."""
    import fcntl

    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _manifest_failures(folder: Path) -> list[str]:
    """``reforge.json``, when present, must say the write completed."""
    try:
        manifest = read_manifest(folder)
    except CorruptCheckpointError:
        return ["reforge.json is not a JSON object"]
    state = manifest.state if manifest is not None else None
    return [] if state in (None, "complete") else [f"reforge.json says the write is {state!r}, not 'complete'"]


def _is_leftover(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in _LEFTOVER_PATTERNS)


def _safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], str | None]:
    """The tensors of a safetensors file (`reforge.io.format.read_header`), or why the file is not whole."""
    try:
        tensors, _ = read_header(path)
    except CorruptCheckpointError as e:
        return {}, e.reason
    size = path.stat().st_size
    end = max((info.end for info in tensors.values()), default=size)
    if end != size:  # read_header refuses data past the end; bytes after the last tensor mean a bad copy
        return {}, f"padded: tensors end at byte {end} of a {size}-byte file"
    return tensors, None


def _check_weights(folder: Path, headers: dict[str, dict[str, TensorInfo]]) -> list[str]:
    failures: list[str] = []
    indexes = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors.index.json"))
    indexed: set[str] = set()
    for index in indexes:
        try:
            weight_map, _ = read_weight_map(folder / index)
            shards = shard_names(folder / index, index_name=index, where=folder.name)
        except (CorruptCheckpointError, CheckpointNotFoundError, UnsafePathError) as err:
            failures.append(f"{index}: {err}")
            continue
        indexed.update(shards)
        parent = PurePosixPath(index).parent
        for shard in shards:
            if not (folder / shard).is_file():
                failures.append(f"{index} names {shard}, which is missing")
        for tensor, shard in sorted(weight_map.items()):
            rel = str(parent / shard) if str(parent) != "." else shard
            if rel in headers and tensor not in headers[rel]:
                failures.append(f"{index} puts {tensor} in {rel}, which does not hold it")
                break
    for rel in sorted(headers):
        stem = PurePosixPath(rel)
        if re.fullmatch(r".*-\d{5}-of-\d{5}\.safetensors", stem.name) and rel not in indexed:
            failures.append(f"{rel} is a shard that no index names (left from an earlier run?)")
    nested = any(PurePosixPath(r).name.startswith("model") and "/" in r for r in headers)
    has_adapter = "adapter_model.safetensors" in headers
    root_model = "model.safetensors" in headers or "model.safetensors.index.json" in indexes
    if not (root_model or has_adapter):
        failures.append(
            "no model weights (model.safetensors, model.safetensors.index.json with its shards, or "
            "adapter_model.safetensors)" + (" at the top of the folder" if nested else "")
        )
    if root_model and not (folder / "config.json").is_file():
        failures.append("config.json is missing next to the model weights")
    if has_adapter and not (folder / "adapter_config.json").is_file():
        failures.append("adapter_config.json is missing next to adapter_model.safetensors")
    return failures


def push_failures(folder: str | Path, *, verify: bool = True) -> list[str]:
    """What stops ``folder`` from being pushed: `check_folder` and `secret_failures`, then (when those pass and
    ``verify``) the full `reforge verify` checks. `push_folder` and ``reforge push --dry-run`` run exactly this."""
    failures = check_folder(folder)
    failures += secret_failures(folder) if Path(folder).is_dir() else []
    if not failures and verify:
        failures = _verify_failures(Path(folder))
    return failures


def secret_failures(folder: str | Path) -> list[str]:
    """Every file `push_folder` would upload whose name or bytes hold a token-like string (`reforge.errors.
    find_secret`: a Hugging Face token, a URL's ``user:password@``, a ``?token=``); each failure names the file, the
    kind and the byte offset, never the token. Safetensors files are searched in their header (names and
    ``__metadata__``: the tensor data is numbers), every other file whole."""
    folder = Path(folder)
    failures = []
    for rel, size in upload_plan(folder):
        found = find_secret(rel)
        if found is not None:
            failures.append(f"the file name {mask_secrets(rel)!r} holds {found[0]}")
            continue
        found = _secret_in_file(folder / rel, size)
        if found is not None:
            failures.append(f"{rel} holds {found[0]} at byte {found[1]} (it would be uploaded as it is)")
    return failures


def _secret_in_file(path: Path, size: int) -> tuple[str, int] | None:
    """The first `find_secret` in ``path``, read in 1 MiB blocks that overlap by 4 KiB (a token across two blocks is
    found)."""
    end = size
    if path.name.endswith(".safetensors"):
        with path.open("rb") as handle:
            head = handle.read(8)
        end = min(size, 8 + int.from_bytes(head, "little")) if len(head) == 8 else size
    block, overlap, start = 1 << 20, 4096, 0
    with path.open("rb") as handle:
        while start < end:
            handle.seek(start)
            data = handle.read(min(block, end - start))
            found = find_secret(data.decode("latin-1"))  # byte for byte: offsets are byte offsets
            if found is not None:
                return found[0], start + found[1]
            if start + len(data) >= end:
                return None
            start += len(data) - overlap
    return None


def _verify_failures(folder: Path) -> list[str]:
    """Failures from `reforge.ops.verify.verify_checkpoint` (without the embedding comparison, which loads the
    retriever and the new model: that is left to an explicit `reforge verify`)."""
    from reforge.ops.verify import verify_checkpoint

    report = verify_checkpoint(folder, embeddings=False)
    return [] if report.ok else (list(report.failures) or ["reforge verify failed"])


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    progress: ProgressFn | None = None,
    endpoint: str | None = None,
    verify: bool = True,
) -> str:
    """Upload a finished checkpoint folder to a Hub model repo in one commit; return the commit URL.

    The repo is created when missing (private unless ``private=False``; an existing repo keeps its visibility)
    and the branch ``revision`` too. Before anything is sent, `check_folder` must pass, and with ``verify`` so
    must `reforge.ops.verify.verify_checkpoint`. Rerunning after an interruption is safe: the commit
    is atomic, and files the Hub already holds with the same content are skipped (no empty commit is made).

    Args:
        folder: the checkpoint folder (e.g. what `reforge merge` wrote).
        repo_id: ``owner/name`` (``owner/name@branch`` works like ``revision``).
        private: create the repo private (default).
        token: token with write access; None uses HF_TOKEN or the saved login. Never printed.
        revision: branch to commit to (created from ``main`` when missing); default ``main``.
        commit_message: default ``"Upload <folder> with reforge <version>"``.
        progress: ``progress(done_bytes, total_bytes)``: 0 before the upload, total after it.
        endpoint: Hub URL; default HF_ENDPOINT as set now.
        verify: also run the full `reforge verify` checks (the CLI's ``--skip-verify`` turns this off).

    Raises:
        VerificationError: the folder is incomplete or fails verification (fields ``path``, ``failures``).
        HubError (and subclasses): the Hub refused or could not be reached.

    Example:
        >>> push_folder("scifact-retriever/", "me/repllama-scifact")  # doctest: +SKIP
        'https://huggingface.co/me/repllama-scifact/commit/...'
    """
    from huggingface_hub import HfApi

    from reforge import __version__

    repo_id, revision = _with_revision(repo_id, revision)
    folder = Path(folder)
    failures = push_failures(folder, verify=verify)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise VerificationError(
            f"{short_path(folder)} is not ready to push: {failures[0]}{more}.",
            hint="Nothing was uploaded. Rerun the command that wrote it, then `reforge verify` it.",
            path=folder,
            failures=failures,
        )
    if _offline():
        raise HubError(
            "Cannot push while HF_HUB_OFFLINE is set.",
            hint="Unset HF_HUB_OFFLINE and rerun.",
            repo_id=repo_id,
            reason="offline",
        )
    total = sum(size for _, size in upload_plan(folder))
    if progress is not None:
        progress(0, total)
    url = hub_endpoint(endpoint)
    api = HfApi(endpoint=url, token=token)
    with _hub_errors(repo_id, revision, writing=True):  # each step is safe to retry: a commit is all or nothing
        with bounded():  # metadata calls: huggingface_hub's own timeouts, and the deadline
            repo_id = retrying(
                lambda: api.create_repo(repo_id, private=private, exist_ok=True), what=f"Creating {repo_id}"
            ).repo_id
            if revision and revision != "main":
                retrying(
                    lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
                    what=f"Creating branch {revision} of {repo_id}",
                )
        message = commit_message or f"Upload {folder.name} with reforge {__version__}"
        info = retrying(
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=message,
                ignore_patterns=list(_UPLOAD_IGNORE),
            ),
            deadline=False,  # an upload of 14 GB may rightly take an hour
            what=f"Uploading {folder.name} to {repo_id}",
        )
    if progress is not None:
        progress(total, total)
    return str(info.commit_url)
