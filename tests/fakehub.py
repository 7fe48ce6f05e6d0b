"""A fake Hugging Face Hub on 127.0.0.1, for tests that must never reach the internet.

It speaks the few HTTP routes that `huggingface_hub` (read from its source, version 2.x) uses to read a model repo
and to push one with `create_repo` + `upload_folder`:

    GET  /api/models/{ns}/{name}[/revision/{rev}]     model_info (siblings; sizes with ?blobs=true)
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]  list_repo_tree / list_repo_files
    HEAD /{ns}/{name}/resolve/{rev}/{path}            hf_hub_download metadata: ETag, X-Repo-Commit, Content-Length
    GET  /{ns}/{name}/resolve/{rev}/{path}            the file (honours Range)
    POST /api/repos/create                            {"url": ...}; 409 when it exists
    POST /api/validate-yaml                           parses the README front matter with PyYAML
    POST /api/models/{ns}/{name}/preupload/{rev}      every file "regular", with the git oid of the stored file
    POST /api/models/{ns}/{name}/commit/{rev}         NDJSON: header line, then base64 "file" / "deletedFile" lines
    POST /api/models/{ns}/{name}/branch/{branch}      create_branch; 409 when it exists

Every request is logged (`FakeHub.requests`), so a test can prove which files were fetched and that a token was
sent. Private repos answer 401/RepoNotFound unless the request carries a known token; writes always need one.

Use the `fake_hub` fixture (import it into a test module), or `with FakeHub() as hub, hub.guard(): ...`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# Files treated like git-LFS files (ETag = sha256, X-Linked-Etag), as the real Hub does for weights.
_LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".msgpack", ".h5", ".gguf", ".pt", ".pth")
WRITE_TOKEN = "hf_fake_write_token_0123456789"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub calls a regular file's oid (and `huggingface_hub` computes too)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class LoggedRequest:
    """One request the fake Hub answered."""

    method: str
    path: str  # unquoted, without the query string
    query: dict[str, list[str]]
    authorization: str | None
    status: int = 0
    json: Any = None  # parsed body for JSON endpoints
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None


@dataclass
class FakeRepo:
    """A repo: commits (sha -> {path: bytes}), refs (branch -> sha), and who may read it."""

    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    history: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (sha, message, changed paths)

    def resolve(self, revision: str) -> str | None:
        """The commit sha of a branch name or a full sha, or None."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 (a random free port) that behaves enough like the Hub.

    Args:
        tokens: token -> user name. Requests with ``Authorization: Bearer <token>`` for a known token are
            authenticated; private repos and all writes need one. Default: ``{WRITE_TOKEN: "user"}``.
    """

    def __init__(self, *, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens) if tokens is not None else {WRITE_TOKEN: "user"}
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[LoggedRequest] = []
        self._failures: list[tuple[str, str, int]] = []  # (method, path regex, status), consumed once each
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The endpoint to hand to `huggingface_hub` (``http://127.0.0.1:PORT``)."""
        assert self._server is not None, "FakeHub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        """Start serving in a daemon thread."""
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the server and wait for its thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Make `huggingface_hub` refuse any request to a host other than 127.0.0.1 while inside.

        Installs a client factory whose first request hook raises for any other host, then restores the previous one.
        """
        import httpx2
        from huggingface_hub.utils import _http

        def refuse_other_hosts(request: httpx2.Request) -> None:
            if request.url.host != "127.0.0.1":
                raise RuntimeError(f"test tried to reach {request.url.host}; only the fake Hub on 127.0.0.1 is allowed")

        def factory() -> httpx2.Client:
            return httpx2.Client(
                event_hooks={"request": [refuse_other_hosts, _http.hf_request_event_hook]},
                follow_redirects=True,
                timeout=30,
            )

        previous = _http._GLOBAL_CLIENT_FACTORY
        _http.set_client_factory(factory)
        try:
            yield
        finally:
            _http.set_client_factory(previous)

    # ---- building repos in tests -----------------------------------------------------------------------------
    def create_repo(self, repo_id: str, *, private: bool = False) -> FakeRepo:
        """A new repo whose ``main`` holds one commit with a ``.gitattributes``, like the real Hub makes."""
        with self._lock:
            repo = FakeRepo(repo_id=repo_id, private=private)
            self.repos[repo_id] = repo
            self._commit(
                repo,
                "main",
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                [],
                "initial commit",
            )
            return repo

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        branch: str = "main",
        deleted: list[str] | tuple[str, ...] = (),
        message: str = "test commit",
    ) -> str:
        """Commit files (bytes or paths to read) onto a branch, creating the repo and branch as needed."""
        if repo_id not in self.repos:
            self.create_repo(repo_id)
        repo = self.repos[repo_id]
        data = {path: (Path(v).read_bytes() if isinstance(v, Path) else v) for path, v in files.items()}
        with self._lock:
            if branch not in repo.refs:
                repo.refs[branch] = repo.refs["main"]
            return self._commit(repo, branch, data, list(deleted), message)

    def add_folder(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        branch: str = "main",
        private: bool = False,
        extra: dict[str, bytes] | None = None,
    ) -> str:
        """Commit every file under ``folder`` (plus ``extra``) to ``repo_id``; returns the commit sha."""
        if repo_id not in self.repos:
            self.create_repo(repo_id, private=private)
        folder = Path(folder)
        files: dict[str, bytes | Path] = {
            p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        files.update(extra or {})
        return self.commit(repo_id, files, branch=branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision."""
        repo = self.repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None, f"{repo_id} has no revision {revision!r}"
        return dict(repo.commits[sha])

    def fail_next(self, method: str, path_regex: str, status: int = 500) -> None:
        """Answer the next request matching ``method`` and ``path_regex`` with ``status`` (once)."""
        with self._lock:
            self._failures.append((method, path_regex, status))

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Filenames fetched with GET on the resolve route (HEAD requests are not downloads), in order."""
        return [
            r.filename
            for r in self.requests
            if r.method == "GET" and r.filename is not None and (repo_id is None or r.repo_id == repo_id)
        ]

    def calls(self, method: str, path_regex: str) -> list[LoggedRequest]:
        """Logged requests whose method and path match."""
        return [r for r in self.requests if r.method == method and re.search(path_regex, r.path)]

    # ---- internals -------------------------------------------------------------------------------------------
    def _commit(self, repo: FakeRepo, branch: str, files: dict[str, bytes], deleted: list[str], message: str) -> str:
        parent = repo.refs.get(branch)
        tree = dict(repo.commits[parent]) if parent else {}
        changed = []
        for path in deleted:
            removed = [p for p in tree if p == path or p.startswith(path.rstrip("/") + "/")]
            for p in removed:
                del tree[p]
            changed += removed
        for path, content in files.items():
            if tree.get(path) != content:
                changed.append(path)
            tree[path] = content
        self._counter += 1
        seed = f"{repo.repo_id}|{parent}|{self._counter}|{message}|" + "|".join(
            f"{p}:{git_blob_sha1(c)}" for p, c in sorted(tree.items())
        )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = tree
        repo.refs[branch] = sha
        repo.history.append((sha, message, changed))
        return sha

    def _take_failure(self, method: str, path: str) -> int | None:
        with self._lock:
            for i, (m, regex, status) in enumerate(self._failures):
                if m == method and re.search(regex, path):
                    del self._failures[i]
                    return status
        return None

    def _user(self, authorization: str | None) -> str | None:
        if authorization and authorization.startswith("Bearer "):
            return self.tokens.get(authorization[len("Bearer ") :])
        return None


_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(rf"^/api/models/{_REPO}$"), "_model_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$"), "_model_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "_tree"),
    ("POST", re.compile(r"^/api/repos/create$"), "_create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "_validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "_preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "_commit_route"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "_branch"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "_resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "_resolve"),
]


class _Answer(Exception):
    """Raised inside a route to send an error answer."""

    def __init__(self, status: int, message: str, *, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    # ---- plumbing --------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        body = self._read_body()
        log = LoggedRequest(
            method=method,
            path=unquote(split.path),
            query=parse_qs(split.query),
            authorization=self.headers.get("Authorization"),
        )
        self.hub.requests.append(log)
        failure = self.hub._take_failure(method, log.path)
        if failure is not None:
            log.status = failure
            return self._send(failure, b'{"error": "injected failure"}', {"Content-Type": "application/json"})
        for route_method, pattern, handler_name in _ROUTES:
            match = pattern.match(split.path)
            if route_method == method and match:
                groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                if "ns" in groups:
                    log.repo_id = f"{groups['ns']}/{groups['name']}"
                log.revision = groups.get("rev")
                if handler_name == "_resolve":
                    log.filename = groups.get("path")
                try:
                    if body and self.headers.get("Content-Type", "").startswith("application/json"):
                        log.json = json.loads(body)
                    getattr(self, handler_name)(log, groups, body)
                except _Answer as answer:
                    headers = {"Content-Type": "application/json"}
                    if answer.code:
                        headers["X-Error-Code"] = answer.code
                    if answer.commit:
                        headers["X-Repo-Commit"] = answer.commit
                    log.status = answer.status
                    self._send(answer.status, json.dumps({"error": answer.message}).encode(), headers)
                return
        log.status = 404
        self._send(
            404,
            json.dumps({"error": f"fake hub has no route {method} {split.path}"}).encode(),
            {"Content-Type": "application/json"},
        )

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        head: bool = False,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, log: LoggedRequest, data: Any, status: int = 200) -> None:
        log.status = status
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _repo(self, log: LoggedRequest, groups: dict[str, str], *, write: bool = False) -> FakeRepo:
        repo_id = f"{groups['ns']}/{groups['name']}"
        repo = self.hub.repos.get(repo_id)
        user = self.hub._user(log.authorization)
        if repo is None or (repo.private and user is None):
            status = 401 if user is None else 404
            raise _Answer(status, f"Repository {repo_id} not found", code="RepoNotFound")
        if write and user is None:
            raise _Answer(401, "Invalid credentials in Authorization header")
        return repo

    def _sha(self, repo: FakeRepo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise _Answer(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return sha

    # ---- routes ----------------------------------------------------------------------------------------------
    def _model_info(self, log: LoggedRequest, groups: dict[str, str], body: bytes) -> None:
        repo = self._repo(log, groups)
        sha = self._sha(repo, groups.get("rev", "main"))
        blobs = log.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, content in sorted(repo.commits[sha].items()):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=len(content), blobId=git_blob_sha1(content))
                if path.endswith(_LFS_SUFFIXES):
                    entry["lfs"] = {
                        "size": len(content),
                        "sha256": hashlib.sha256(content).hexdigest(),
                        "pointerSize": 134,
                    }
            siblings.append(entry)
        self._json(
            log,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "siblings": siblings,
                "tags": [],
                "downloads": 0,
                "likes": 0,
            },
        )

    def _tree(self, log: LoggedRequest, groups: dict[str, str], body: bytes) -> None:
        repo = self._repo(log, groups)
        sha = self._sha(repo, groups["rev"])
        prefix = groups.get("path", "").strip("/")
        recursive = log.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for path, content in sorted(repo.commits[sha].items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            if not recursive and "/" in rest:
                folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}
            if path.endswith(_LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
        self._json(log, entries)

    def _resolve(self, log: LoggedRequest, groups: dict[str, str], body: bytes) -> None:
        repo = self._repo(log, groups)
        sha = self._sha(repo, groups["rev"])
        path = groups["path"]
        content = repo.commits[sha].get(path)
        if content is None:
            raise _Answer(404, f"Entry not found: {path}", code="EntryNotFound", commit=sha)
        headers = {"X-Repo-Commit": sha, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if path.endswith(_LFS_SUFFIXES):
            etag = hashlib.sha256(content).hexdigest()
            headers.update({"ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(content)}"'
        status, payload = 200, content
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and log.method == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(content) - 1
            payload = content[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(payload) - 1}/{len(content)}"
        log.status = status
        self._send(status, payload, headers, head=log.method == "HEAD", length=len(payload))

    def _create(self, log: LoggedRequest, groups: dict[str, str], body: bytes) -> None:
        user = self.hub._user(log.authorization)
        if user is None:
            raise _Answer(401, "Invalid credentials in Authorization header")
        payload = log.json or {}
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if repo_id in self.hub.repos:  # the real Hub's 409 also carries the url, which create_repo reads
            return self._json(
                log, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"}, status=409
            )
        self.hub.create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._json(log, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, log: LoggedRequest, groups: dict[str, str], body: bytes) -> None:
        import yaml

        content = (log.json or {}).get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        errors = []
        if match:
            try:
                if not isinstance(yaml.safe_load(match.group(1)), dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return self._json(log, {"errors": errors, "warnings": []}, status=400)
        self._json(log, {"errors": [], "warnings": []})

    def _preupload(self, log: LoggedRequest, groups: dict[str, str], body: bytes) -> None:
        repo = self._repo(log, groups, write=True)
        sha = repo.resolve(groups["rev"])
        tree = repo.commits[sha] if sha else {}
        files = []
        for f in (log.json or {}).get("files", []):
            existing = tree.get(f["path"])
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        self._json(log, {"files": files, "commitOid": sha})

    def _commit_route(self, log: LoggedRequest, groups: dict[str, str], body: bytes) -> None:
        repo = self._repo(log, groups, write=True)
        branch = groups["rev"]
        if branch not in repo.refs:
            raise _Answer(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        log.json = lines
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            if line["key"] == "file":
                assert line["value"]["encoding"] == "base64"
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(line["value"]["path"])
            else:
                raise _Answer(400, f"fake hub does not support commit operation {line['key']!r}")
        with self.hub._lock:
            sha = self.hub._commit(repo, branch, files, deleted, header.get("summary", ""))
        self._json(
            log,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}",
                "hookOutput": "",
            },
        )

    def _branch(self, log: LoggedRequest, groups: dict[str, str], body: bytes) -> None:
        repo = self._repo(log, groups, write=True)
        branch = groups["rev"]
        if branch in repo.refs:
            raise _Answer(409, f"Branch {branch} already exists")
        start = (log.json or {}).get("startingPoint") or "main"
        repo.refs[branch] = self._sha(repo, start)
        self._json(log, {})


def fake_hub_fixture(tmp_path: Path, monkeypatch: Any) -> Iterator[FakeHub]:
    """Body of the `fake_hub` fixture: a started FakeHub, `huggingface_hub` allowed online but only to 127.0.0.1.

    HF_HOME, HF_HUB_CACHE and HF_ENDPOINT point at tmp and the fake, HF_HUB_OFFLINE=0 (reforge reads these at call
    time); the
    imported `huggingface_hub.constants` get offline mode off and a token path under tmp, so no saved login of
    the developer is ever read.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    with FakeHub() as hub, hub.guard():
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def build_tiny_llama(folder: Path, *, max_shard_size: str = "20KB") -> Path:
    """Save a bare LlamaModel (hidden 32, 2 layers, seed 0) in 5 safetensors shards plus a WordLevel tokenizer.

    The repo the tests serve; built from a config, nothing is downloaded.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    words = "the a how do vaccines work train immune system retrieval query passage science text".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        pad_token_id=0,
    )
    LlamaModel(config).save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    return Path(folder)
