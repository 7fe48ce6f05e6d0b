"""Reading checkpoints from the Hugging Face Hub (pushing is `reforge.publish`, above ops: it verifies first).

Reading (`download_checkpoint`) lists a repo at one revision, picks only what a checkpoint needs (config,
tokenizer and sentence-transformers files, the model card, and safetensors weights: an index and the shards it
names, or a single file, or a peft adapter), and fetches each file with `hf_hub_download` into the normal HF cache.
Pickle weights are fetched only when no safetensors exist and ``allow_pickle`` is given. Unrelated files (onnx,
gguf, flax, tf, openvino, code) are never fetched.

The cache is huggingface_hub's and so is its layout: files land where `hf_hub_download` puts them, a cached
checkpoint is found with `snapshot_download(local_files_only=True)` and `try_to_load_from_cache`, and the one entry
written here (``refs/<revision>``, since every file is fetched by commit) goes where `repo_folder_name` says.

HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE are read when a function runs (huggingface_hub itself reads
them once, at import), and every function also takes ``endpoint``. Tokens are passed to huggingface_hub and never
appear in a message or log line. huggingface_hub failures become reforge errors with the next step to take.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from reforge.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    HubError,
    HubOfflineError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    InvalidOptionError,
    PickleRefusedError,
    ShardNotFoundError,
    UnsafePathError,
    short_path,
)
from reforge.io.atomic import write_atomic
from reforge.io.companions import COMPANION_NAMES
from reforge.io.http import HubLimits, bounded, is_timeout, retrying, tries_of
from reforge.io.index import read_weight_map
from reforge.io.progress import ProgressFn

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
_REPO_ID_RE = re.compile(rf"^{_NAME}/{_NAME}$")

# Files a checkpoint needs besides its weights (exact names at the repo root): the companions a merged output
# carries, plus the card and an adapter's config.
_META_FILES = COMPANION_NAMES | {"README.md", "adapter_config.json"}
_META_PATTERNS = ("reforge*.json",)  # reforge provenance records
# sentence-transformers module folders (1_Pooling, 2_Dense, 2_Normalize ...): their configs and weights.
_ST_MODULE_RE = re.compile(r"^\d+_[^/]+/[^/]+\.(json|txt|model)$")

# Weight groups: (folder, safetensors index, safetensors single, pickle index, pickle single).
_ROOT_GROUPS = (
    ("", "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ("", None, "adapter_model.safetensors", None, "adapter_model.bin"),
)


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
    return (
        bool(_REPO_ID_RE.match(repo_id))
        and ".." not in repo_id
        and "--" not in repo_id
        and not repo_id.endswith((".git", "."))
    )


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
            ref=ref,
        )
    repo_id, _, revision = ref.partition("@")
    return repo_id, (revision or None)


def _with_revision(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    """Validate ``repo_id`` (which may carry ``@revision``) and merge it with a ``revision`` argument."""
    repo_id, at = parse_ref(repo_id)
    if at and revision and at != revision:
        raise InvalidOptionError(
            f"{repo_id}@{at} names revision {at!r} but revision={revision!r} was also given.",
            hint="Give the revision once.",
            option="revision",
        )
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

    return (
        os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        or constants.is_offline_mode()
    )


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
    chosen = {
        n
        for n in names
        if n in _META_FILES or _ST_MODULE_RE.match(n) or any(fnmatch.fnmatch(n, p) for p in _META_PATTERNS)
    }
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
            path=f"{where}/{refused[0]}",
        )
    if not any(w.startswith(("model", "pytorch_model", "adapter_model")) for w in weights):
        raise CheckpointNotFoundError(
            f"{where} holds no model weights (model.safetensors, model.safetensors.index.json with shards, or a "
            "peft adapter_model.safetensors).",
            hint="Check the repo id and revision: is this the checkpoint you meant?",
            ref=where,
        )
    return DownloadPlan(files=tuple(sorted(chosen | set(weights))), indexes=tuple(indexes), pickle=pickle)


def shard_names(index_file: str | Path, *, index_name: str, where: str = "") -> list[str]:
    """The shard files an index's ``weight_map`` names, as repo paths relative to the repo root, sorted.

    Raises:
        UnsafePathError: an entry is absolute or leaves the folder (fields ``index``, ``entry``).
        CheckpointNotFoundError: the index is not JSON or has no ``weight_map``.
    """
    where = where or "the checkpoint"
    try:
        weight_map, _ = read_weight_map(Path(index_file))
        entries = set(weight_map.values())
    except CorruptCheckpointError as err:
        raise CheckpointNotFoundError(
            f"{where}/{index_name} is not a valid index (JSON with a 'weight_map' object).",
            hint="Re-save the checkpoint, or point to another revision.",
            ref=where,
        ) from err
    parent = PurePosixPath(index_name).parent
    shards = []
    for entry in entries:
        pure = PurePosixPath(str(entry))
        if not isinstance(entry, str) or pure.is_absolute() or ".." in pure.parts or "\\" in entry or not entry:
            raise UnsafePathError(
                f"{where}/{index_name} names {entry!r}, a path outside the checkpoint folder.",
                hint="Refusing to read it; fix the index file.",
                index=f"{where}/{index_name}",
                entry=entry,
            )
        shards.append(str(parent / pure) if str(parent) != "." else str(pure))
    return sorted(shards)


# ---- reading ---------------------------------------------------------------------------------------------------
def download_checkpoint(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
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
            info = retrying(
                lambda: api.model_info(repo_id, revision=revision, files_metadata=True),
                what=f"Reading the file list of {repo_id}",
            )
        except _connection_errors() as err:
            return _from_cache(
                repo_id,
                revision,
                cache,
                allow_pickle=allow_pickle,
                reason=f"the Hub at {url} {_unreachable(err)}",
                cause=err,
            )
        if not info.sha:
            raise HubError(
                f"The Hub at {url} did not say which commit {repo_id} is at.",
                hint="Check HF_ENDPOINT: it must point to a Hugging Face Hub.",
                repo_id=repo_id,
                reason="no commit sha",
            )
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        plan = select_files(sizes, allow_pickle=allow_pickle, where=repo_id)
        fetch = _Fetcher(repo_id=repo_id, commit=info.sha, cache=cache, token=token, endpoint=url)
        indexes = {index: fetch(index) for index in plan.indexes}
        shards = _shards_in_listing(indexes, sizes, repo_id)
        files = list(plan.files) + [s for s in shards if s not in plan.files]
        fetch.start_progress(progress, total=sum(sizes[f] for f in files), done=sum(sizes[i] for i in plan.indexes))
        for name in files:
            if name not in plan.indexes:
                fetch(name, size=sizes[name])
    _write_ref(cache, repo_id, revision or "main", info.sha)
    assert fetch.snapshot is not None  # select_files chose at least one weight file, and it was fetched
    return fetch.snapshot


def _shards_in_listing(indexes: Mapping[str, Path], listing: Mapping[str, int], repo_id: str) -> list[str]:
    """The shards the fetched ``indexes`` (``{repo path: local file}``) name, each checked to be in the listing."""
    shards: list[str] = []
    for index, local in indexes.items():
        for shard in shard_names(local, index_name=index, where=repo_id):
            if shard not in listing:
                raise ShardNotFoundError(
                    f"{repo_id}/{index} names {shard}, which is not in the repo.",
                    hint="The upload is incomplete: try another revision, or tell the repo's owner.",
                    path=f"{repo_id}/{shard}",
                    index=f"{repo_id}/{index}",
                )
            shards.append(shard)
    return shards


class _Fetcher:
    """hf_hub_download for one commit, reporting bytes to a progress callback. ``snapshot`` is the folder
    huggingface_hub put the fetched files in (None before the first)."""

    def __init__(self, *, repo_id: str, commit: str, cache: Path, token: str | None, endpoint: str) -> None:
        self.repo_id, self.commit, self.cache, self.token, self.endpoint = repo_id, commit, cache, token, endpoint
        self.snapshot: Path | None = None
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
        path = hf_hub_download(
            self.repo_id,
            name,
            revision=self.commit,
            cache_dir=self.cache,
            token=self.token,
            endpoint=self.endpoint,
            tqdm_class=_tqdm_reporting(self._report),
        )
        if self.done - before != size:  # a cached file reports nothing; a resumed one may report less
            self._report(size - (self.done - before))
        # the file is <snapshot>/<name>: the snapshot folder is whatever huggingface_hub chose, not rebuilt here
        self.snapshot = Path(path).parents[len(PurePosixPath(name).parts) - 1]
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


def _write_ref(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` in the cache so the reference resolves offline (`snapshot_download` and
    `try_to_load_from_cache` read it). hf_hub_download records a ref only for a revision it resolved itself; every
    file here is fetched by the commit the listing named (so all come from one commit), hence this one file, written
    atomically where huggingface_hub keeps refs."""
    from huggingface_hub.file_download import repo_folder_name

    if revision == commit:
        return
    ref = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text() != commit:
        write_atomic(ref, lambda f: f.write(commit.encode()))


def _from_cache(
    repo_id: str,
    revision: str | None,
    cache: Path,
    *,
    allow_pickle: bool,
    reason: str,
    cause: BaseException | None = None,
) -> Path:
    """The cached snapshot for ``revision`` if it holds every file the checkpoint needs, else HubOfflineError."""
    from huggingface_hub import try_to_load_from_cache

    snapshot = _cached_snapshot(repo_id, revision, cache)
    ref_text = f"{repo_id}@{revision}" if revision else repo_id
    names = (
        [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()] if snapshot is not None else []
    )
    missing: list[str] = []
    if snapshot is not None and names:
        commit = snapshot.name

        def cached(name: str) -> bool:
            return isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache, revision=commit), str)

        plan = select_files(names, allow_pickle=allow_pickle, where=repo_id)
        missing = [f for f in plan.files if not cached(f)]
        for index in plan.indexes:
            if cached(index):
                missing += [s for s in shard_names(snapshot / index, index_name=index, where=repo_id) if not cached(s)]
        if not missing:
            return snapshot
    what = f"missing {', '.join(missing[:3])}" if missing else "not downloaded before"
    raise HubOfflineError(
        f"Cannot read {ref_text}: {reason}, and it is not in the local cache ({short_path(cache)}: {what}).",
        hint="Go online once to download it (unset HF_HUB_OFFLINE), or pass a local folder.",
        repo_id=repo_id,
        revision=revision,
        ref=ref_text,
        reason=reason,
        missing=missing,
    ) from cause


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The snapshot folder ``revision`` (a branch, tag or commit; default ``main``) resolves to in the cache, as
    huggingface_hub finds it offline, or None when it has none. A snapshot huggingface_hub knows to lack files of a
    full listing (an earlier `hf download` of the whole repo) is still returned: only the checkpoint's files matter
    here, and `_from_cache` checks those."""
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except hf.LocalEntryNotFoundError as err:
        incomplete = getattr(err, "snapshot_path", None)  # IncompleteSnapshotError (huggingface_hub 2.4 and later)
        return Path(incomplete) if incomplete else None


def _connection_errors() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError, OfflineModeIsEnabled)


def _unreachable(error: BaseException) -> str:
    """How the Hub failed to answer, for messages: the timeout, and the tries and seconds `retrying` spent."""
    if is_timeout(error):
        spent = tries_of(error)
        tries = f"{spent[0]} tries in {spent[1]:.0f} s; " if spent else ""
        return (
            f"did not answer within {_read_timeout(error):g} s ({tries}REFORGE_HUB_READ_TIMEOUT, REFORGE_HUB_RETRIES "
            "and REFORGE_HUB_DEADLINE set the limits)"
        )
    return f"could not be reached ({type(error).__name__})"


def _read_timeout(error: BaseException | None) -> float:
    """The read timeout the failed request ran with (`bounded` puts it on each request), else the default."""
    while error is not None:
        try:
            timeout = error.request.extensions.get("timeout") or {}  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # httpx raises RuntimeError when an error has no request
            timeout = {}
        if timeout.get("read") is not None:
            return float(timeout["read"])
        error = error.__cause__ or error.__context__
    return HubLimits.from_env().timeouts()[1]


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, *, writing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub failures into reforge errors (the token never goes into a message)."""
    from huggingface_hub import errors as hf

    ref = f"{repo_id}@{revision}" if revision else repo_id
    try:
        with bounded(upload=writing):  # huggingface_hub's client has no timeout of its own
            yield
    except hf.GatedRepoError as err:
        raise HubRepoNotFoundError(
            f"Hub repo {repo_id} is gated and this token has no access to it.",
            hint=f"Accept its terms on the Hub page of {repo_id}, then pass --token or run `hf auth login`.",
            repo_id=repo_id,
            revision=revision,
            ref=ref,
            reason="gated",
        ) from err
    except hf.RepositoryNotFoundError as err:
        raise HubRepoNotFoundError(
            f"Hub repo {repo_id} was not found, or it is private and no token with access was sent.",
            hint="Check the repo id; for a private repo pass --token or run `hf auth login`.",
            repo_id=repo_id,
            revision=revision,
            ref=ref,
            reason="not found",
        ) from err
    except hf.RevisionNotFoundError as err:
        raise HubRevisionNotFoundError(
            f"Hub repo {repo_id} has no revision {revision!r}.",
            hint="Check the branch, tag or commit after '@' (the repo's 'Files' page lists branches).",
            repo_id=repo_id,
            revision=revision,
            ref=ref,
            reason="revision not found",
        ) from err
    except (hf.LocalEntryNotFoundError, *_connection_errors()) as err:
        if writing:
            raise HubError(
                f"Could not push {repo_id}: the Hub {_unreachable(err)}."
                if is_timeout(err)
                else f"Could not reach the Hub to push {repo_id} ({type(err).__name__}).",
                hint="Check the network, then rerun: files already on the Hub are skipped.",
                repo_id=repo_id,
                reason="unreachable",
            ) from err
        raise HubOfflineError(
            f"Lost the connection to the Hub while downloading {ref}: it {_unreachable(err)}."
            if is_timeout(err)
            else f"Lost the connection to the Hub while downloading {ref} ({type(err).__name__}).",
            hint="Check the network, then rerun: files already downloaded stay in the cache.",
            repo_id=repo_id,
            revision=revision,
            ref=ref,
            reason="unreachable",
            missing=[],
        ) from err
    except hf.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if status in (401, 403):
            action = "write to" if writing else "read"
            hint = (
                "Pass a token with write access (--token, HF_TOKEN) or run `hf auth login`."
                if writing
                else "Pass --token or run `hf auth login`."
            )
            raise HubError(
                f"The Hub refused to let this token {action} {repo_id} (HTTP {status}).",
                hint=hint,
                repo_id=repo_id,
                reason=f"HTTP {status}",
            ) from err
        hint = (
            "Rerunning the same command is safe: files already on the Hub are skipped."
            if writing
            else "Try again later, or pass a local folder."
        )
        raise HubError(
            f"Hub request for {ref} failed: {first}",
            hint=hint,
            repo_id=repo_id,
            reason=f"HTTP {status}" if status else first,
        ) from err
