"""Reading checkpoints from, and pushing folders to, the Hugging Face Hub.

Reading (`download_checkpoint`) lists a repo at one revision, picks only what a checkpoint needs (config,
tokenizer and sentence-transformers files, the model card, and safetensors weights: an index and the shards it
names, or a single file, or a peft adapter), and fetches each file with `hf_hub_download` into the normal HF cache.
Pickle weights are fetched only when no safetensors exist and ``allow_pickle`` is given. Unrelated files (onnx,
gguf, flax, tf, openvino, code) are never fetched.

Pushing (`push_folder`) refuses a folder that is incomplete (`check_folder`, plus `reforge.ops.verify` when it
exists), then runs `create_repo(exist_ok=True)` and `upload_folder`. A rerun is safe: files already on the Hub with
the same content are skipped by huggingface_hub, and a commit is all or nothing.

HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE are read when a function runs (huggingface_hub itself reads
them once, at import), and every function also takes ``endpoint``. Tokens are passed to huggingface_hub and never
appear in a message or log line. huggingface_hub failures become reforge errors with the next step to take.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from reforge.errors import (
    CheckpointNotFoundError,
    HubError,
    HubOfflineError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    InvalidOptionError,
    PickleRefusedError,
    ShardNotFoundError,
    UnsafePathError,
    VerificationError,
    short_path,
)

ProgressFn = Callable[[int, "int | None"], None]

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
_REPO_ID_RE = re.compile(rf"^{_NAME}/{_NAME}$")

# Files a checkpoint needs besides its weights (exact names at the repo root).
_META_FILES = frozenset({
    "config.json", "generation_config.json", "README.md",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
    "adapter_config.json",
})
_META_PATTERNS = ("reforge*.json",)  # reforge provenance records
# sentence-transformers module folders (1_Pooling, 2_Dense, 2_Normalize ...): their configs and weights.
_ST_MODULE_RE = re.compile(r"^\d+_[^/]+/[^/]+\.(json|txt|model)$")

# Weight groups: (folder, safetensors index, safetensors single, pickle index, pickle single).
_ROOT_GROUPS = (
    ("", "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ("", None, "adapter_model.safetensors", None, "adapter_model.bin"),
)

# Names that mean a writer did not finish (temporary files, partial downloads, locks).
_LEFTOVER_PATTERNS = ("*.tmp", "*.tmp.*", "*.tmp-*", ".tmp*", "tmp*.safetensors", "*.partial", "*.partial.*",
                      "*.incomplete", "*.lock", "*.part", "*~")
_UPLOAD_IGNORE = (".git", ".git/*", "*/.git", "**/.git/**", ".cache/huggingface", ".cache/huggingface/*",
                  "*/.cache/huggingface", "**/.cache/huggingface/**")


# ---- references ------------------------------------------------------------------------------------------------
def looks_like_repo_id(ref: str) -> bool:
    """Whether ``ref`` is written like a Hub model reference: ``owner/name`` or ``owner/name@revision``.

    Only the spelling is checked (a namespace is required, so a stray local name such as ``out`` is never taken
    for a repo). A relative local path like ``runs/delta`` is spelled the same way: check for a local folder first.

    Example:
        >>> looks_like_repo_id("intfloat/e5-mistral-7b-instruct@main"), looks_like_repo_id("./delta")
        (True, False)
    """
    repo_id, sep, revision = str(ref).partition("@")
    if sep and not revision.strip():
        return False
    return bool(_REPO_ID_RE.match(repo_id)) and ".." not in repo_id and "--" not in repo_id \
        and not repo_id.endswith((".git", "."))


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``owner/name@revision`` into ``(repo_id, revision)``; revision is None when not given.

    A revision is a branch, tag or commit and may itself hold ``/`` (``owner/name@refs/pr/1``).

    Raises:
        CheckpointNotFoundError: ``ref`` is not spelled like a Hub repo id (field ``ref``).

    Example:
        >>> parse_ref("castorini/repllama-v1-7b-lora-passage@v2")
        ('castorini/repllama-v1-7b-lora-passage', 'v2')
    """
    if not looks_like_repo_id(ref):
        raise CheckpointNotFoundError(
            f"{ref!r} is neither an existing local folder nor a Hub repo id.",
            hint="Write a Hub repo as owner/name or owner/name@revision, or give the path of a local folder.",
            ref=ref)
    repo_id, _, revision = ref.partition("@")
    return repo_id, (revision or None)


def _with_revision(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    """Validate ``repo_id`` (which may carry ``@revision``) and merge it with a ``revision`` argument."""
    repo_id, at = parse_ref(repo_id)
    if at and revision and at != revision:
        raise InvalidOptionError(f"{repo_id}@{at} names revision {at!r} but revision={revision!r} was also given.",
                                 hint="Give the revision once.", option="revision")
    return repo_id, revision or at


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub URL to talk to: ``endpoint``, else HF_ENDPOINT as set now, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The HF cache folder as the environment says now: HF_HUB_CACHE, else HF_HOME/hub, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"} \
        or constants.is_offline_mode()


# ---- choosing files --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadPlan:
    """What to fetch from a repo listing.

    ``files``: fixed files (metadata, single-file weights, index files). ``indexes``: the index files among them
    whose ``weight_map`` names further shard files. ``pickle``: True when pickle weights were chosen.
    """

    files: tuple[str, ...]
    indexes: tuple[str, ...]
    pickle: bool


def select_files(names: Iterable[str], *, allow_pickle: bool = False, where: str = "") -> DownloadPlan:
    """Choose the files of a checkpoint from a repo's (or cached snapshot's) file names.

    Safetensors are preferred in each weight group (root model, peft adapter, each sentence-transformers module
    folder); pickles are chosen only for a group that has no safetensors, and only with ``allow_pickle``.

    Raises:
        PickleRefusedError: a needed group has only pickle weights and ``allow_pickle`` is False (field ``path``).
        CheckpointNotFoundError: there are no model weights at all (field ``ref``).
    """
    names = set(names)
    chosen = {n for n in names if n in _META_FILES or _ST_MODULE_RE.match(n)
              or any(fnmatch.fnmatch(n, p) for p in _META_PATTERNS)}
    groups = list(_ROOT_GROUPS)
    for folder in sorted({n.split("/")[0] for n in names if "/" in n and re.match(r"^\d+_", n)}):
        groups.append((folder + "/", None, "model.safetensors", None, "pytorch_model.bin"))
    indexes, refused, weights, pickle = [], [], [], False
    for folder, st_index, st_single, pk_index, pk_single in groups:
        st = [folder + n for n in (st_index, st_single) if n and folder + n in names]
        pk = [folder + n for n in (pk_index, pk_single) if n and folder + n in names]
        pick = st[:1] or (pk[:1] if allow_pickle else [])
        if not pick and pk:
            refused.append(pk[0])
        if pick:
            weights.append(pick[0])
            pickle = pickle or pick[0] in pk
            if pick[0].endswith(".index.json"):
                indexes.append(pick[0])
    where = where or "the checkpoint"
    if refused:
        raise PickleRefusedError(
            f"{where} has only pickle weights for {refused[0]} (no safetensors). Pickle files can run code when "
            "loaded, so reforge does not read them by default.",
            hint="Pass --allow-pickle (allow_pickle=True) to load them with torch.load(weights_only=True), "
                 "or convert the checkpoint to safetensors.",
            path=f"{where}/{refused[0]}")
    if not any(w.startswith(("model", "pytorch_model", "adapter_model")) for w in weights):
        raise CheckpointNotFoundError(
            f"{where} holds no model weights (model.safetensors, model.safetensors.index.json with shards, or a "
            "peft adapter_model.safetensors).",
            hint="Check the repo id and revision: is this the checkpoint you meant?", ref=where)
    return DownloadPlan(files=tuple(sorted(chosen | set(weights))), indexes=tuple(indexes), pickle=pickle)


def shard_names(index_file: str | Path, *, index_name: str, where: str = "") -> list[str]:
    """The shard files an index's ``weight_map`` names, as repo paths relative to the repo root, sorted.

    Raises:
        UnsafePathError: an entry is absolute or leaves the folder (fields ``index``, ``entry``).
        CheckpointNotFoundError: the index is not JSON or has no ``weight_map``.
    """
    where = where or "the checkpoint"
    try:
        weight_map = json.loads(Path(index_file).read_text())["weight_map"]
        entries = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointNotFoundError(
            f"{where}/{index_name} is not a valid index (JSON with a 'weight_map' object).",
            hint="Re-save the checkpoint, or point to another revision.", ref=where) from err
    parent = PurePosixPath(index_name).parent
    shards = []
    for entry in entries:
        pure = PurePosixPath(str(entry))
        if not isinstance(entry, str) or pure.is_absolute() or ".." in pure.parts or "\\" in entry or not entry:
            raise UnsafePathError(f"{where}/{index_name} names {entry!r}, a path outside the checkpoint folder.",
                                  hint="Refusing to read it; fix the index file.", index=f"{where}/{index_name}",
                                  entry=entry)
        shards.append(str(parent / pure) if str(parent) != "." else str(pure))
    return sorted(shards)


# ---- reading ---------------------------------------------------------------------------------------------------
def download_checkpoint(repo_id: str, *, revision: str | None = None, token: str | None = None,
                        allow_pickle: bool = False, progress: ProgressFn | None = None,
                        endpoint: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Fetch the files a checkpoint needs from a Hub repo into the HF cache; return its snapshot folder.

    Args:
        repo_id: ``owner/name``, or ``owner/name@revision`` when ``revision`` is not given.
        revision: branch, tag or commit; default ``main``. All files come from the one commit it resolves to.
        token: a Hub token; None uses HF_TOKEN or the login `hf auth login` saved. Never printed.
        allow_pickle: accept ``pytorch_model.bin`` / ``adapter_model.bin`` when a group has no safetensors.
        progress: ``progress(done_bytes, total_bytes)``, called as bytes arrive.
        endpoint: Hub URL; default HF_ENDPOINT as set now.
        cache_dir: HF cache; default HF_HUB_CACHE or HF_HOME/hub as set now.

    Returns:
        ``<cache>/models--owner--name/snapshots/<commit>``, holding the chosen files (and ``refs/<revision>``
        written, so the same reference resolves offline later).

    Raises:
        HubRepoNotFoundError, HubRevisionNotFoundError, HubOfflineError (offline and not cached), HubError,
        PickleRefusedError, ShardNotFoundError, UnsafePathError, CheckpointNotFoundError (not a repo id, no
        weights), InvalidOptionError (two different revisions given).

    Example:
        >>> folder = download_checkpoint("intfloat/e5-mistral-7b-instruct", revision="main")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    repo_id, revision = _with_revision(repo_id, revision)
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if _offline():
        return _from_cache(repo_id, revision, cache, allow_pickle=allow_pickle, reason="HF_HUB_OFFLINE is set")
    url = hub_endpoint(endpoint)
    api = HfApi(endpoint=url, token=token)
    with _hub_errors(repo_id, revision):
        try:
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
        except _connection_errors() as err:
            return _from_cache(repo_id, revision, cache, allow_pickle=allow_pickle,
                               reason=f"the Hub at {url} could not be reached ({type(err).__name__})", cause=err)
        if not info.sha:
            raise HubError(f"The Hub at {url} did not say which commit {repo_id} is at.",
                           hint="Check HF_ENDPOINT: it must point to a Hugging Face Hub.", repo_id=repo_id,
                           reason="no commit sha")
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        plan = select_files(sizes, allow_pickle=allow_pickle, where=repo_id)
        fetch = _Fetcher(repo_id=repo_id, commit=info.sha, cache=cache, token=token, endpoint=url)
        for index in plan.indexes:
            fetch(index)
        shards = _shards_in_listing(fetch.snapshot, plan.indexes, sizes, repo_id)
        files = list(plan.files) + [s for s in shards if s not in plan.files]
        fetch.start_progress(progress, total=sum(sizes[f] for f in files), done=sum(sizes[i] for i in plan.indexes))
        for name in files:
            if name not in plan.indexes:
                fetch(name, size=sizes[name])
    _write_ref(cache, repo_id, revision or "main", info.sha)
    return fetch.snapshot


def _shards_in_listing(snapshot: Path, indexes: Iterable[str], listing: Mapping[str, int], repo_id: str) -> list[str]:
    shards: list[str] = []
    for index in indexes:
        for shard in shard_names(snapshot / index, index_name=index, where=repo_id):
            if shard not in listing:
                raise ShardNotFoundError(
                    f"{repo_id}/{index} names {shard}, which is not in the repo.",
                    hint="The upload is incomplete: try another revision, or tell the repo's owner.",
                    path=f"{repo_id}/{shard}", index=f"{repo_id}/{index}")
            shards.append(shard)
    return shards


class _Fetcher:
    """hf_hub_download for one commit, reporting bytes to a progress callback."""

    def __init__(self, *, repo_id: str, commit: str, cache: Path, token: str | None, endpoint: str) -> None:
        self.repo_id, self.commit, self.cache, self.token, self.endpoint = repo_id, commit, cache, token, endpoint
        self.snapshot = cache / _repo_folder(repo_id) / "snapshots" / commit
        self.progress: ProgressFn | None = None
        self.total = self.done = 0

    def start_progress(self, progress: ProgressFn | None, *, total: int, done: int) -> None:
        self.progress, self.total, self.done = progress, total, done
        self._report(0)

    def _report(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def __call__(self, name: str, *, size: int = 0) -> Path:
        from huggingface_hub import hf_hub_download

        before = self.done
        path = hf_hub_download(self.repo_id, name, revision=self.commit, cache_dir=self.cache, token=self.token,
                               endpoint=self.endpoint, tqdm_class=_tqdm_reporting(self._report))
        if self.done - before != size:  # a cached file reports nothing; a resumed one may report less
            self._report(size - (self.done - before))
        return Path(path)


def _tqdm_reporting(report: Callable[[int], None]) -> type:
    """A silent tqdm class for hf_hub_download that forwards byte counts to ``report``."""
    from tqdm import tqdm

    class _Bar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if n:
                report(int(n))
            return None

    return _Bar


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _write_ref(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` in the cache (as hf_hub_download does) so the reference resolves offline."""
    if revision == commit:
        return
    ref = cache / _repo_folder(repo_id) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text() != commit:
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)


def _from_cache(repo_id: str, revision: str | None, cache: Path, *, allow_pickle: bool, reason: str,
                cause: BaseException | None = None) -> Path:
    """The cached snapshot for ``revision`` if it holds every file the checkpoint needs, else HubOfflineError."""
    rev = revision or "main"
    folder = cache / _repo_folder(repo_id)
    ref = folder / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snapshot = folder / "snapshots" / commit
    ref_text = f"{repo_id}@{revision}" if revision else repo_id
    names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()] \
        if snapshot.is_dir() else []
    missing: list[str] = []
    if names:
        plan = select_files(names, allow_pickle=allow_pickle, where=repo_id)
        missing = [f for f in plan.files if not (snapshot / f).is_file()]
        for index in plan.indexes:
            missing += [s for s in shard_names(snapshot / index, index_name=index, where=repo_id)
                        if not (snapshot / s).is_file()]
        if not missing:
            return snapshot
    what = f"missing {', '.join(missing[:3])}" if missing else "not downloaded before"
    raise HubOfflineError(
        f"Cannot read {ref_text}: {reason}, and it is not in the local cache ({short_path(cache)}: {what}).",
        hint="Go online once to download it (unset HF_HUB_OFFLINE), or pass a local folder.",
        repo_id=repo_id, revision=revision, ref=ref_text, reason=reason, missing=missing) from cause


def _connection_errors() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError, OfflineModeIsEnabled)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, *, writing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub failures into reforge errors (the token never goes into a message)."""
    from huggingface_hub import errors as hf

    ref = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except hf.GatedRepoError as err:
        raise HubRepoNotFoundError(
            f"Hub repo {repo_id} is gated and this token has no access to it.",
            hint=f"Accept its terms on the Hub page of {repo_id}, then pass --token or run `hf auth login`.",
            repo_id=repo_id, revision=revision, ref=ref, reason="gated") from err
    except hf.RepositoryNotFoundError as err:
        raise HubRepoNotFoundError(
            f"Hub repo {repo_id} was not found, or it is private and no token with access was sent.",
            hint="Check the repo id; for a private repo pass --token or run `hf auth login`.",
            repo_id=repo_id, revision=revision, ref=ref, reason="not found") from err
    except hf.RevisionNotFoundError as err:
        raise HubRevisionNotFoundError(
            f"Hub repo {repo_id} has no revision {revision!r}.",
            hint="Check the branch, tag or commit after '@' (the repo's 'Files' page lists branches).",
            repo_id=repo_id, revision=revision, ref=ref, reason="revision not found") from err
    except (hf.LocalEntryNotFoundError, *_connection_errors()) as err:
        if writing:
            raise HubError(f"Could not reach the Hub to push {repo_id} ({type(err).__name__}).",
                           hint="Check the network, then rerun: files already on the Hub are skipped.",
                           repo_id=repo_id, reason="unreachable") from err
        raise HubOfflineError(f"Lost the connection to the Hub while downloading {ref} ({type(err).__name__}).",
                              hint="Check the network, then rerun: files already downloaded stay in the cache.",
                              repo_id=repo_id, revision=revision, ref=ref, reason="unreachable", missing=[]) from err
    except hf.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if status in (401, 403):
            action = "write to" if writing else "read"
            hint = ("Pass a token with write access (--token, HF_TOKEN) or run `hf auth login`." if writing
                    else "Pass --token or run `hf auth login`.")
            raise HubError(f"The Hub refused to let this token {action} {repo_id} (HTTP {status}).", hint=hint,
                           repo_id=repo_id, reason=f"HTTP {status}") from err
        hint = ("Rerunning the same command is safe: files already on the Hub are skipped." if writing
                else "Try again later, or pass a local folder.")
        raise HubError(f"Hub request for {ref} failed: {first}", hint=hint, repo_id=repo_id,
                       reason=f"HTTP {status}" if status else first) from err


# ---- pushing ---------------------------------------------------------------------------------------------------
def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """The ``(repo path, bytes)`` pairs `push_folder` would upload, sorted (what ``--dry-run`` prints)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    kept = filter_repo_objects(sorted(files), ignore_patterns=list(_UPLOAD_IGNORE))
    return [(name, files[name]) for name in kept]


def check_folder(folder: str | Path) -> list[str]:
    """Cheap completeness checks on a checkpoint folder before upload; returns the failures (empty when fine).

    Checks: it is a folder with no leftover temporary, partial or lock files, no reforge run writing it now
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
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if _is_leftover(path.name) and not rel.startswith((".git/", ".cache/")):
            failures.append(f"{rel} is a leftover temporary, partial or lock file")
    failures += _manifest_failures(folder)
    headers: dict[str, dict[str, Any]] = {}
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
    for lock in (folder.with_name(f".{folder.name}.reforge-lock"), folder.with_name(f"{folder.name}.lock")):
        if lock.is_file() and _lock_is_held(lock):
            failures.append(f"another run is writing this folder right now (it holds {short_path(lock)})")
    partial = folder.with_name(f".{folder.name}.reforge-partial")
    if partial.exists():
        failures.append(f"{short_path(partial)} holds an unfinished rewrite of this folder: rerun the command that "
                        "wrote it to finish, or delete the partial folder")
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
    manifest = folder / "reforge.json"
    if not manifest.is_file():
        return []
    try:
        state = json.loads(manifest.read_text()).get("state")
    except (ValueError, AttributeError):
        return ["reforge.json is not a JSON object"]
    return [] if state in (None, "complete") else [f"reforge.json says the write is {state!r}, not 'complete'"]


def _is_leftover(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in _LEFTOVER_PATTERNS)


def _safetensors_header(path: Path) -> tuple[dict[str, Any], str | None]:
    """The header of a safetensors file, or a description of why it is not whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}, f"truncated ({size} bytes, no header)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return {}, f"truncated: header says {length} bytes but the file has {size - 8} after the length"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return {}, "header is not valid JSON"
    data = size - 8 - length
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if ends and max(ends) != data:
        return {}, f"truncated or padded: tensors end at byte {max(ends)} of a {data}-byte data section"
    return header, None


def _check_weights(folder: Path, headers: dict[str, dict[str, Any]]) -> list[str]:
    failures: list[str] = []
    indexes = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors.index.json"))
    indexed: set[str] = set()
    for index in indexes:
        try:
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            shards = shard_names(folder / index, index_name=index, where=folder.name)
        except (ValueError, KeyError, TypeError, CheckpointNotFoundError, UnsafePathError) as err:
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
        failures.append("no model weights (model.safetensors, model.safetensors.index.json with its shards, or "
                        "adapter_model.safetensors)" + (" at the top of the folder" if nested else ""))
    if root_model and not (folder / "config.json").is_file():
        failures.append("config.json is missing next to the model weights")
    if has_adapter and not (folder / "adapter_config.json").is_file():
        failures.append("adapter_config.json is missing next to adapter_model.safetensors")
    return failures


def push_failures(folder: str | Path, *, verify: bool = True) -> list[str]:
    """What stops ``folder`` from being pushed: `check_folder`, then (when that passes and ``verify``) the full
    `reforge verify` checks. `push_folder` and ``reforge push --dry-run`` run exactly this."""
    failures = check_folder(folder)
    if not failures and verify:
        failures = _verify_failures(Path(folder))
    return failures


def _verify_failures(folder: Path) -> list[str]:
    """Failures from the full `reforge.ops.verify.verify_checkpoint`, when that module exists."""
    from importlib import import_module
    from importlib.util import find_spec

    if find_spec("reforge.ops") is None or find_spec("reforge.ops.verify") is None:
        return []
    # the embedding comparison loads the retriever and the new model; leave that to an explicit `reforge verify`
    report = import_module("reforge.ops.verify").verify_checkpoint(folder, embeddings=False)
    return [] if report.ok else (list(report.failures) or ["reforge verify failed"])


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None,
                progress: ProgressFn | None = None, endpoint: str | None = None, verify: bool = True) -> str:
    """Upload a finished checkpoint folder to a Hub model repo in one commit; return the commit URL.

    The repo is created when missing (private unless ``private=False``; an existing repo keeps its visibility)
    and the branch ``revision`` too. Before anything is sent, `check_folder` must pass, and with ``verify`` so
    must `reforge.ops.verify.verify_checkpoint` (when present). Rerunning after an interruption is safe: the commit
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
        raise VerificationError(f"{short_path(folder)} is not ready to push: {failures[0]}{more}.",
                                hint="Nothing was uploaded. Rerun the command that wrote it, then `reforge verify` it.",
                                path=folder, failures=failures)
    if _offline():
        raise HubError("Cannot push while HF_HUB_OFFLINE is set.", hint="Unset HF_HUB_OFFLINE and rerun.",
                       repo_id=repo_id, reason="offline")
    total = sum(size for _, size in upload_plan(folder))
    if progress is not None:
        progress(0, total)
    url = hub_endpoint(endpoint)
    api = HfApi(endpoint=url, token=token)
    with _hub_errors(repo_id, revision, writing=True):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        message = commit_message or f"Upload {folder.name} with reforge {__version__}"
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message,
                                 ignore_patterns=list(_UPLOAD_IGNORE))
    if progress is not None:
        progress(total, total)
    return str(info.commit_url)
