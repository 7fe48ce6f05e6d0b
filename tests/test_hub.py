"""reforge.hub and `reforge push` against the fake Hub on 127.0.0.1 (tests/fakehub.py); nothing reaches the internet."""

from __future__ import annotations

import doctest
import functools
import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from fakehub import WRITE_TOKEN, FakeHub, build_tiny_llama, fake_hub_fixture
from reforge import publish
from reforge.cli import cli, main
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
)
from reforge.io import hub

SECRET = "hf_DoNotPrintMe_5f3a9c"  # a token that must never show up in any message or output
STRAYS = {  # files a checkpoint does not need: none may be downloaded
    "model.onnx": b"onnx graph",
    "onnx/model.onnx": b"onnx graph",
    "pytorch_model.bin": b"pickled weights",
    "flax_model.msgpack": b"flax",
    "tf_model.h5": b"tf",
    "model-q4_k_m.gguf": b"GGUF",
    "modeling_custom.py": b"x=1",
    "openvino/openvino_model.bin": b"ov",
    "training_args.bin": b"pickle",
    ".gitattributes": b"*.bin lfs\n",
}


@pytest.fixture(autouse=True)
def _offline_by_default(tmp_path, monkeypatch):
    """No test talks to any Hub unless it asks for the fake one."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-offline"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    yield from fake_hub_fixture(tmp_path, monkeypatch)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A bare LlamaModel (hidden 32, 2 layers) in 5 safetensors shards, with a WordLevel tokenizer."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) == 5
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- references ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref, expected",
    [
        ("castorini/repllama-v1-7b-lora-passage", ("castorini/repllama-v1-7b-lora-passage", None)),
        ("intfloat/e5-mistral-7b-instruct@main", ("intfloat/e5-mistral-7b-instruct", "main")),
        ("me/model@refs/pr/1", ("me/model", "refs/pr/1")),
        ("me/model@0123456789abcdef0123456789abcdef01234567", ("me/model", "0123456789abcdef0123456789abcdef01234567")),
    ],
)
def test_parse_ref_splits_repo_and_revision(ref, expected):
    assert hub.looks_like_repo_id(ref)
    assert hub.parse_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["./delta", "/abs/out", "out", "a/b/c", "me/model@", "me--x/y", "me/../x", "~/models/x", "me/model.git", ""]
)
def test_parse_ref_refuses_what_is_not_a_repo_id(ref):
    assert not hub.looks_like_repo_id(ref)
    with pytest.raises(CheckpointNotFoundError) as info:
        hub.parse_ref(ref)
    assert str(info.value) == (
        f"{ref!r} is neither an existing local folder nor a Hub repo id. Write a Hub repo as "
        "owner/name or owner/name@revision, or give the path of a local folder."
    )
    assert info.value.ref == ref


def test_docstring_examples_run():
    import reforge.card

    for module in (hub, reforge.card):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# ---- choosing files --------------------------------------------------------------------------------------------
def test_select_files_sentence_transformers_layout():
    listing = [
        "modules.json",
        "config.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
        "2_Dense/pytorch_model.bin",
        "model.safetensors",
        "pytorch_model.bin",
        "tokenizer.json",
        "vocab.txt",
        "special_tokens_map.json",
        "onnx/model.onnx",
        "openvino/openvino_model.xml",
        "rust_model.ot",
        "tf_model.h5",
        "README.md",
        "train_script.py",
        "data_config.json",
    ]
    plan = hub.select_files(listing, where="sentence-transformers/x")
    assert plan.files == (
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
        "README.md",
        "config.json",
        "config_sentence_transformers.json",
        "model.safetensors",
        "modules.json",
        "sentence_bert_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "vocab.txt",
    )
    assert plan.indexes == () and plan.pickle is False


def test_select_files_refuses_a_pickle_only_module_folder():
    listing = ["config.json", "model.safetensors", "modules.json", "2_Dense/config.json", "2_Dense/pytorch_model.bin"]
    with pytest.raises(PickleRefusedError) as info:
        hub.select_files(listing, where="me/st")
    assert info.value.path == "me/st/2_Dense/pytorch_model.bin"
    assert "--allow-pickle" in str(info.value)
    assert "2_Dense/pytorch_model.bin" in hub.select_files(listing, allow_pickle=True).files


def test_select_files_prefers_the_index_and_pickle_index_when_allowed():
    assert hub.select_files(["config.json", "model.safetensors", "model.safetensors.index.json"]).indexes == (
        "model.safetensors.index.json",
    )
    plan = hub.select_files(
        ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"], allow_pickle=True
    )
    assert plan.files == ("config.json", "pytorch_model.bin.index.json") and plan.pickle


# ---- reading ---------------------------------------------------------------------------------------------------
def test_download_fetches_only_the_checkpoint_files(fake_hub, tiny_model, tmp_path):
    import torch
    from transformers import LlamaModel

    sha = fake_hub.add_folder("org/tiny", tiny_model, extra={**STRAYS, "README.md": b"# tiny\n"})
    seen: list[tuple[int, int | None]] = []
    snapshot = hub.download_checkpoint("org/tiny", progress=lambda done, total: seen.append((done, total)))

    wanted = _files(tiny_model) | {"README.md": b"# tiny\n"}
    assert snapshot == tmp_path / "hf-home" / "hub" / "models--org--tiny" / "snapshots" / sha
    assert _files(snapshot) == wanted  # exactly these files, bit for bit
    assert sorted(fake_hub.downloads("org/tiny")) == sorted(wanted)  # the server sent nothing else
    resolves = [r for r in fake_hub.requests if r.filename is not None]
    assert {r.revision for r in resolves} == {sha}  # every file from the one commit main pointed to
    total = sum(len(b) for b in wanted.values())
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert (snapshot.parents[1] / "refs" / "main").read_text() == sha

    loaded = LlamaModel.from_pretrained(snapshot).state_dict()
    original = LlamaModel.from_pretrained(tiny_model).state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)


def test_second_download_reads_the_cache(fake_hub, tiny_model):
    fake_hub.add_folder("org/tiny", tiny_model)
    first = hub.download_checkpoint("org/tiny")
    n = len(fake_hub.downloads())
    assert hub.download_checkpoint("org/tiny") == first
    assert len(fake_hub.downloads()) == n  # only the listing was asked again


def test_revision_is_honoured(fake_hub, tiny_model):
    main_sha = fake_hub.add_folder("org/tiny", tiny_model)
    config = json.loads((tiny_model / "config.json").read_text())
    v2_config = json.dumps({**config, "reforge_test_revision": "v2"}).encode()
    v2_sha = fake_hub.commit("org/tiny", {"config.json": v2_config}, branch="v2")

    v2 = hub.download_checkpoint("org/tiny", revision="v2")
    main_snapshot = hub.download_checkpoint("org/tiny")
    assert v2.name == v2_sha and main_snapshot.name == main_sha
    assert (v2 / "config.json").read_bytes() == v2_config
    assert (main_snapshot / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    assert (v2.parents[1] / "refs" / "v2").read_text() == v2_sha
    assert hub.download_checkpoint("org/tiny", revision=main_sha) == main_snapshot  # a commit sha works too


def test_unknown_revision_is_a_clear_error(fake_hub, tiny_model):
    fake_hub.add_folder("org/tiny", tiny_model)
    with pytest.raises(HubRevisionNotFoundError) as info:
        hub.download_checkpoint("org/tiny", revision="no-such-branch")
    assert str(info.value) == (
        "Hub repo org/tiny has no revision 'no-such-branch'. Check the branch, tag or commit "
        "after '@' (the repo's 'Files' page lists branches)."
    )
    assert (info.value.repo_id, info.value.revision) == ("org/tiny", "no-such-branch")


def test_missing_repo_names_token_and_login_but_never_the_token(fake_hub):
    with pytest.raises(HubRepoNotFoundError) as info:
        hub.download_checkpoint("org/nothing-here", token=SECRET)
    message = str(info.value)
    assert message == (
        "Hub repo org/nothing-here was not found, or it is private and no token with access was sent. "
        "Check the repo id; for a private repo pass --token or run `hf auth login`."
    )
    assert SECRET not in message and SECRET not in repr(info.value.__cause__)
    assert isinstance(info.value, CheckpointNotFoundError)
    assert fake_hub.requests[-1].authorization == f"Bearer {SECRET}"  # the token was sent, not shown


def test_private_repo_needs_a_token(fake_hub, tiny_model):
    from huggingface_hub import constants

    fake_hub.add_folder("org/private", tiny_model, private=True)
    with pytest.raises(HubRepoNotFoundError):
        hub.download_checkpoint("org/private")
    with pytest.raises(HubRepoNotFoundError) as info:
        hub.download_checkpoint("org/private", token=SECRET)  # a token the Hub does not know
    assert SECRET not in str(info.value)
    snapshot = hub.download_checkpoint("org/private", token=WRITE_TOKEN)
    assert _files(snapshot) == _files(tiny_model)
    assert {r.authorization for r in fake_hub.requests if r.repo_id == "org/private"} >= {f"Bearer {WRITE_TOKEN}"}
    # the saved login (`hf auth login` writes HF_TOKEN_PATH) is used when no token is given
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(WRITE_TOKEN)
    assert hub.download_checkpoint("org/private") == snapshot


def test_pickle_only_repo_is_refused_without_allow_pickle(fake_hub, tiny_model):
    config = (tiny_model / "config.json").read_bytes()
    fake_hub.commit("org/pickled", {"config.json": config, "pytorch_model.bin": b"PICKLE-BYTES"})
    with pytest.raises(PickleRefusedError) as info:
        hub.download_checkpoint("org/pickled")
    assert str(info.value) == (
        "org/pickled has only pickle weights for pytorch_model.bin (no safetensors). Pickle files can run code when "
        "loaded, so reforge does not read them by default. Pass --allow-pickle (allow_pickle=True) to load them with "
        "torch.load(weights_only=True), or convert the checkpoint to safetensors."
    )
    assert info.value.path == "org/pickled/pytorch_model.bin"
    assert fake_hub.downloads() == []  # refused before anything was fetched

    snapshot = hub.download_checkpoint("org/pickled", allow_pickle=True)
    assert _files(snapshot) == {"config.json": config, "pytorch_model.bin": b"PICKLE-BYTES"}


def test_lora_adapter_repo_in_pickle_form_is_refused(fake_hub):
    fake_hub.commit(
        "castorini/repllama-like",
        {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.bin": b"PICKLE", "README.md": b"# r\n"},
    )
    with pytest.raises(PickleRefusedError, match="adapter_model.bin"):
        hub.download_checkpoint("castorini/repllama-like")
    fake_hub.commit(
        "me/adapter",
        {
            "adapter_config.json": b'{"peft_type": "LORA"}',
            "adapter_model.safetensors": b"ST",
            "adapter_model.bin": b"PICKLE",
        },
    )
    snapshot = hub.download_checkpoint("me/adapter", allow_pickle=True)
    assert sorted(_files(snapshot)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_repo_without_weights_is_refused(fake_hub, tiny_model):
    fake_hub.commit("org/empty", {"config.json": (tiny_model / "config.json").read_bytes(), "model.onnx": b"x"})
    with pytest.raises(CheckpointNotFoundError, match=r"^org/empty holds no model weights"):
        hub.download_checkpoint("org/empty")


def test_index_naming_a_missing_or_unsafe_shard(fake_hub, tiny_model):
    files = {k: v for k, v in _files(tiny_model).items() if k != "model-00003-of-00005.safetensors"}
    fake_hub.commit("org/broken", files)
    with pytest.raises(ShardNotFoundError) as info:
        hub.download_checkpoint("org/broken")
    assert str(info.value) == (
        "org/broken/model.safetensors.index.json names model-00003-of-00005.safetensors, which "
        "is not in the repo. The upload is incomplete: try another revision, or tell the "
        "repo's owner."
    )
    assert info.value.path == "org/broken/model-00003-of-00005.safetensors"
    assert "model-00001-of-00005.safetensors" not in fake_hub.downloads()  # no shard fetched before the check

    index = json.loads(files["model.safetensors.index.json"])
    index["weight_map"]["norm.weight"] = "../../etc/passwd"
    fake_hub.commit("org/evil", {**files, "model.safetensors.index.json": json.dumps(index).encode()})
    with pytest.raises(UnsafePathError) as info:
        hub.download_checkpoint("org/evil")
    assert info.value.entry == "../../etc/passwd"


def test_offline_reads_the_cache_and_fails_clearly_when_not_cached(fake_hub, tiny_model, monkeypatch):
    fake_hub.add_folder("org/tiny", tiny_model)
    fake_hub.commit("org/tiny", {"README.md": b"v2"}, branch="v2")
    snapshot = hub.download_checkpoint("org/tiny")
    n = len(fake_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_checkpoint("org/tiny") == snapshot
    assert len(fake_hub.requests) == n  # not a single request
    with pytest.raises(HubOfflineError) as info:
        hub.download_checkpoint("org/tiny", revision="v2")
    assert str(info.value).startswith(
        "Cannot read org/tiny@v2: HF_HUB_OFFLINE is set, and it is not in the local cache ("
    )
    assert str(info.value).endswith(
        "not downloaded before). Go online once to download it (unset HF_HUB_OFFLINE), or pass a local folder."
    )
    (snapshot / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(HubOfflineError) as info:
        hub.download_checkpoint("org/tiny")
    assert info.value.missing == ["model-00002-of-00005.safetensors"]


def test_the_cache_is_huggingface_hubs_own(fake_hub, tiny_model, tmp_path):
    """What download_checkpoint leaves (files, the ref of a branch) is what huggingface_hub itself finds offline: the
    cache layout has one home, the library."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    fake_hub.add_folder("org/tiny", tiny_model)
    v2_sha = fake_hub.commit("org/tiny", {"README.md": b"v2"}, branch="v2")
    v2 = hub.download_checkpoint("org/tiny", revision="v2")
    cache = tmp_path / "hf-home" / "hub"
    assert Path(snapshot_download("org/tiny", revision="v2", cache_dir=cache, local_files_only=True)) == v2
    found = try_to_load_from_cache("org/tiny", "README.md", cache_dir=cache, revision="v2")
    assert isinstance(found, str) and Path(found) == v2 / "README.md" and v2.name == v2_sha
    assert try_to_load_from_cache("org/tiny", "README.md", cache_dir=cache, revision="main") is None


def test_offline_reads_a_snapshot_the_library_calls_incomplete(fake_hub, tiny_model, monkeypatch, tmp_path):
    """After an online `snapshot_download` that fetched one file, huggingface_hub caches the repo's full listing and
    calls the snapshot incomplete (the strays were never fetched); the checkpoint's own files are all there, so
    reading it offline still works, and a missing shard is still named."""
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    fake_hub.add_folder("org/tiny", tiny_model, extra=STRAYS)
    snapshot = hub.download_checkpoint("org/tiny")
    cache = tmp_path / "hf-home" / "hub"
    snapshot_download("org/tiny", cache_dir=cache, allow_patterns=["config.json"], endpoint=fake_hub.url)  # lists all
    if not hasattr(hf, "IncompleteSnapshotError"):
        pytest.skip("this huggingface_hub does not check snapshots against a cached listing")
    with pytest.raises(hf.IncompleteSnapshotError):
        snapshot_download("org/tiny", cache_dir=cache, local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_checkpoint("org/tiny") == snapshot
    (snapshot / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(HubOfflineError) as info:
        hub.download_checkpoint("org/tiny")
    assert info.value.missing == ["model-00003-of-00005.safetensors"]


def _no_wait(monkeypatch, module) -> list[float]:
    """The back-off waits ``module``'s `retrying` would sleep, recorded instead of slept (its injected ``sleep``)."""
    from reforge.io import http

    waits: list[float] = []
    monkeypatch.setattr(module, "retrying", functools.partial(http.retrying, sleep=waits.append))
    return waits


def test_unreachable_hub_falls_back_to_the_cache(fake_hub, tiny_model, monkeypatch):
    fake_hub.add_folder("org/tiny", tiny_model)
    snapshot = hub.download_checkpoint("org/tiny")
    dead = "http://127.0.0.1:9"  # discard port: connection refused
    waits = _no_wait(monkeypatch, hub)
    assert hub.download_checkpoint("org/tiny", endpoint=dead) == snapshot
    assert waits == [1.0, 2.0, 4.0]  # three retries, backing off (REFORGE_HUB_RETRIES, REFORGE_HUB_BACKOFF)
    with pytest.raises(
        HubOfflineError,
        match=r"^Cannot read org/other: the Hub at http://127.0.0.1:9 could not be "
        r"reached \(ConnectError\)",
    ):
        hub.download_checkpoint("org/other", endpoint=dead)


def test_endpoint_is_read_from_the_environment_at_call_time(fake_hub, tiny_model, monkeypatch):
    fake_hub.add_folder("org/tiny", tiny_model)
    with FakeHub() as other, other.guard():
        other.add_folder("org/tiny", tiny_model, extra={"README.md": b"from the other hub"})
        monkeypatch.setenv("HF_ENDPOINT", other.url)
        snapshot = hub.download_checkpoint("org/tiny")
        assert (snapshot / "README.md").read_bytes() == b"from the other hub"
        assert fake_hub.requests == []


# ---- pushing ---------------------------------------------------------------------------------------------------
@pytest.fixture
def merged(tiny_model, tmp_path) -> Path:
    """A finished output folder: the tiny model plus a rendered model card."""
    from reforge.card import render_model_card

    folder = _copy(tiny_model, tmp_path / "scifact-readapted")
    card = render_model_card(
        {"retriever": {"ref": "org/tiny"}, "adapters": [{"ref": "psi/", "alpha": 0.5}], "beta": 1.0}
    )
    (folder / "README.md").write_text(card)
    return folder


def test_push_then_download_is_bit_identical(fake_hub, merged):
    url = publish.push_folder(merged, "user/readapted", token=WRITE_TOKEN, verify=False)
    repo = fake_hub.repos["user/readapted"]
    assert url == f"{fake_hub.url}/user/readapted/commit/{repo.refs['main']}"
    create = fake_hub.calls("POST", r"^/api/repos/create$")[0]
    assert create.json["visibility"] == "private" and repo.private  # private by default
    assert len(fake_hub.calls("POST", r"^/api/validate-yaml$")) >= 1  # the card's YAML was checked
    assert fake_hub.files("user/readapted") == {
        **_files(merged),
        ".gitattributes": fake_hub.files("user/readapted")[".gitattributes"],
    }
    snapshot = hub.download_checkpoint("user/readapted", token=WRITE_TOKEN)
    assert _files(snapshot) == _files(merged)


def test_push_public_and_to_a_branch(fake_hub, merged):
    url = publish.push_folder(
        merged,
        "user/public-model",
        private=False,
        token=WRITE_TOKEN,
        revision="alpha-0.3",
        commit_message="alpha 0.3",
        verify=False,
    )
    repo = fake_hub.repos["user/public-model"]
    assert fake_hub.calls("POST", r"^/api/repos/create$")[0].json["visibility"] == "public" and not repo.private
    assert url.endswith(repo.refs["alpha-0.3"]) and repo.history[-1][1] == "alpha 0.3"
    assert sorted(fake_hub.files("user/public-model", "main")) == [".gitattributes"]
    assert _files(hub.download_checkpoint("user/public-model", revision="alpha-0.3")) == _files(merged)


def test_rerun_of_push_is_safe_and_sends_only_what_changed(fake_hub, merged):
    first = publish.push_folder(merged, "user/m", token=WRITE_TOKEN, verify=False)
    commits = len(fake_hub.repos["user/m"].history)
    assert publish.push_folder(merged, "user/m", token=WRITE_TOKEN, verify=False) == first  # no empty commit
    assert len(fake_hub.repos["user/m"].history) == commits

    (merged / "README.md").write_text((merged / "README.md").read_text() + "\nUpdated.\n")
    publish.push_folder(merged, "user/m", token=WRITE_TOKEN, verify=False)
    sent = [line["value"]["path"] for line in fake_hub.calls("POST", "/commit/")[-1].json if line["key"] == "file"]
    assert sent == ["README.md"] and fake_hub.repos["user/m"].history[-1][2] == ["README.md"]


def test_transient_commit_failure_is_retried(fake_hub, merged):
    fake_hub.fail_next("POST", r"/commit/main$", status=500)  # huggingface_hub retries 5xx after 1 s
    publish.push_folder(merged, "user/m", token=WRITE_TOKEN, verify=False)
    assert [r.status for r in fake_hub.calls("POST", "/commit/")] == [500, 200]
    assert len(fake_hub.repos["user/m"].history) == 2  # the initial commit and exactly one upload


def test_interrupted_push_can_be_rerun(fake_hub, merged):
    fake_hub.fail_next("POST", r"/commit/main$", status=422)  # a failure huggingface_hub does not retry
    with pytest.raises(HubError) as info:
        publish.push_folder(merged, "user/m", token=WRITE_TOKEN, verify=False)
    assert str(info.value).startswith("Hub request for user/m failed: ")
    assert str(info.value).endswith("Rerunning the same command is safe: files already on the Hub are skipped.")
    assert info.value.reason == "HTTP 422"
    assert sorted(fake_hub.files("user/m")) == [".gitattributes"]  # nothing half-committed
    # an earlier attempt may also have left part of the files on the Hub (e.g. by another tool)
    fake_hub.commit(
        "user/m",
        {
            "config.json": (merged / "config.json").read_bytes(),
            "model-00001-of-00005.safetensors": (merged / "model-00001-of-00005.safetensors").read_bytes(),
        },
    )
    publish.push_folder(merged, "user/m", token=WRITE_TOKEN, verify=False)
    sent = {line["value"]["path"] for line in fake_hub.calls("POST", "/commit/")[-1].json if line["key"] == "file"}
    assert sent == set(_files(merged)) - {"config.json", "model-00001-of-00005.safetensors"}
    assert {k: v for k, v in fake_hub.files("user/m").items() if k != ".gitattributes"} == _files(merged)


def _missing_shard(f: Path) -> str:
    (f / "model-00003-of-00005.safetensors").unlink()
    return "model.safetensors.index.json names model-00003-of-00005.safetensors, which is missing"


def _truncated(f: Path) -> str:
    shard = f / "model-00002-of-00005.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    return "model-00002-of-00005.safetensors: data ends at byte"


def _leftover(f: Path) -> str:
    (f / "model-00004-of-00005.safetensors.incomplete").write_bytes(b"half")
    return "model-00004-of-00005.safetensors.incomplete is a leftover temporary, partial or lock file"


def _lock(f: Path) -> str:
    (f / ".reforge.lock").write_text("1234")
    return ".reforge.lock is a leftover temporary, partial or lock file"


def _stale_shard(f: Path) -> str:
    shutil.copy(f / "model-00001-of-00005.safetensors", f / "model-00001-of-00004.safetensors")
    return "model-00001-of-00004.safetensors is a shard that no index names (left from an earlier run?)"


def _no_weights(f: Path) -> str:
    for p in f.glob("model*"):
        p.unlink()
    return (
        "no model weights (model.safetensors, model.safetensors.index.json with its shards, or "
        "adapter_model.safetensors)"
    )


def _no_config(f: Path) -> str:
    (f / "config.json").unlink()
    return "config.json is missing next to the model weights"


def _wrong_shard(f: Path) -> str:
    index = json.loads((f / "model.safetensors.index.json").read_text())
    index["weight_map"]["norm.weight"] = "model-00001-of-00005.safetensors"
    (f / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.safetensors.index.json puts norm.weight in model-00001-of-00005.safetensors, which does not hold it"


@pytest.mark.parametrize(
    "damage", [_missing_shard, _truncated, _leftover, _lock, _stale_shard, _no_weights, _no_config, _wrong_shard]
)
def test_push_refuses_an_incomplete_folder(fake_hub, merged, damage):
    expected = damage(merged)
    with pytest.raises(VerificationError) as info:
        publish.push_folder(merged, "user/m", token=WRITE_TOKEN)
    assert str(info.value).startswith(f"{merged} is not ready to push: {expected}")
    assert str(info.value).endswith("Nothing was uploaded. Rerun the command that wrote it, then `reforge verify` it.")
    assert info.value.failures[0].startswith(expected)
    assert fake_hub.requests == []


def test_push_refuses_a_temporary_locked_or_unfinished_folder(fake_hub, tiny_model, tmp_path):
    import fcntl

    temp = _copy(tiny_model, tmp_path / "out.tmp-4242")
    assert publish.check_folder(temp) == [
        "out.tmp-4242 looks like a temporary output folder (the run that wrote it did not finish)"
    ]
    done = _copy(tiny_model, tmp_path / "out")
    lock = tmp_path / ".out.reforge-lock"  # what reforge's writer holds (flock) while it writes `out`
    lock.write_text("4242")
    assert publish.check_folder(done) == []  # a stale lock file left by a crash does not block
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(
            VerificationError,
            match=r"not ready to push: another run is writing this folder right "
            r"now \(it holds .*\.out\.reforge-lock\)",
        ):
            publish.push_folder(done, "user/m", token=WRITE_TOKEN)
    (tmp_path / ".out.reforge-partial").mkdir()
    assert publish.check_folder(done) == [
        f"{tmp_path / '.out.reforge-partial'} holds an unfinished rewrite of this "
        "folder: rerun the command that wrote it to finish, or delete the partial folder"
    ]
    (tmp_path / ".out.reforge-partial").rmdir()
    (done / "reforge.json").write_text(json.dumps({"plan_id": "p", "state": "partial"}))
    assert publish.check_folder(done) == ["reforge.json says the write is 'partial', not 'complete'"]
    (done / "reforge.json").write_text(json.dumps({"plan_id": "p", "state": "complete"}))
    assert publish.check_folder(done) == []
    assert publish.check_folder(tmp_path / "nope") == [f"{tmp_path / 'nope'} is not a folder"]
    assert fake_hub.requests == []


def test_push_runs_reforge_verify_when_it_exists(fake_hub, merged, monkeypatch):
    calls = []

    class Report:
        ok = False
        failures = ["layers.0.self_attn.q_proj.weight: 3 values are NaN"]

    module = types.ModuleType("reforge.ops.verify")
    module.__spec__ = importlib.machinery.ModuleSpec("reforge.ops.verify", loader=None)
    module.verify_checkpoint = lambda path, **options: calls.append((Path(path), options)) or Report()
    monkeypatch.setitem(sys.modules, "reforge.ops.verify", module)
    with pytest.raises(
        VerificationError,
        match=r"not ready to push: layers.0.self_attn.q_proj.weight: 3 values are "
        r"NaN\.",
    ):
        publish.push_folder(merged, "user/m", token=WRITE_TOKEN)
    assert calls == [(merged, {"embeddings": False})] and fake_hub.requests == []
    publish.push_folder(merged, "user/m", token=WRITE_TOKEN, verify=False)  # --skip-verify
    assert "user/m" in fake_hub.repos


def test_push_with_the_real_reforge_verify(fake_hub, merged):
    import struct

    import reforge.ops.verify  # noqa: F401  (plainly: a broken import must fail this test, not skip it)

    shard = merged / "model-00005-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    name, tensor = next((k, v) for k, v in json.loads(data[8 : 8 + length]).items() if k != "__metadata__")
    assert tensor["dtype"] == "F32"
    start = 8 + length + tensor["data_offsets"][0]
    original = bytes(data[start : start + 4])
    data[start : start + 4] = struct.pack("<f", float("nan"))  # headers stay whole: only verify can see this
    shard.write_bytes(bytes(data))
    assert publish.check_folder(merged) == []
    with pytest.raises(VerificationError) as info:
        publish.push_folder(merged, "user/verified", token=WRITE_TOKEN)
    assert info.value.failures == [f"finite: NaN/Inf in 1 tensor(s), e.g. {name!r}"]
    assert fake_hub.requests == []

    data[start : start + 4] = original
    shard.write_bytes(bytes(data))
    url = publish.push_folder(merged, "user/verified", token=WRITE_TOKEN)
    assert url == f"{fake_hub.url}/user/verified/commit/{fake_hub.repos['user/verified'].refs['main']}"


def test_merge_output_pushes_and_comes_back_whole(fake_hub, tmp_path):
    """End to end: `reforge merge` on tiny models, then `reforge push` (with the real verify), then a download."""
    import copy

    from conftest import build_model, make_adapter, perturbed_bare, save, save_tokenizer
    from reforge.io.checkpoint import open_checkpoint
    from reforge.ops.job import WriteOptions
    from reforge.ops.merge import merge

    base = build_model("llama-causal")
    base_dir = save(base, tmp_path / "base")
    retriever_dir = save(perturbed_bare(copy.deepcopy(base)), tmp_path / "retriever", shard_size="30KB")
    save_tokenizer(retriever_dir)
    make_adapter(base, tmp_path / "psi", dora=True)
    out = tmp_path / "scifact-readapted"
    merge(
        base_dir,
        out,
        retriever=retriever_dir,
        adapters=[(tmp_path / "psi", 0.5)],
        write=WriteOptions(command="reforge merge ..."),
    )
    assert publish.check_folder(out) == []
    result = CliRunner().invoke(
        cli, ["push", str(out), "user/readapted", "--token", WRITE_TOKEN, "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["files"] == len(_files(out))
    snapshot = hub.download_checkpoint("user/readapted", token=WRITE_TOKEN)
    written = _files(out)
    assert {"README.md", "reforge.json", "config.json", "tokenizer.json", "model.safetensors"} <= written.keys()
    assert _files(snapshot) == written  # every file merge wrote is one a checkpoint needs, and comes back bit for bit
    assert (
        open_checkpoint(str(snapshot)).provenance["fingerprint"] == open_checkpoint(str(out)).provenance["fingerprint"]
    )


def test_push_without_write_token_is_refused(fake_hub, merged):
    with pytest.raises(HubError) as info:
        publish.push_folder(merged, "user/m", token=SECRET, verify=False)
    assert str(info.value) == (
        "The Hub refused to let this token write to user/m (HTTP 401). Pass a token with "
        "write access (--token, HF_TOKEN) or run `hf auth login`."
    )
    assert "user/m" not in fake_hub.repos


def test_push_to_an_unreachable_hub_says_rerun_is_safe(fake_hub, merged, monkeypatch):
    waits = _no_wait(monkeypatch, publish)
    with pytest.raises(HubError) as info:
        publish.push_folder(merged, "user/m", token=WRITE_TOKEN, verify=False, endpoint="http://127.0.0.1:9")
    assert waits == [1.0, 2.0, 4.0]
    assert str(info.value) == (
        "Could not reach the Hub to push user/m (ConnectError). Check the network, then rerun: "
        "files already on the Hub are skipped."
    )


def test_lost_connection_during_download_is_a_reforge_error():
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(HubOfflineError) as info:
        with hub._hub_errors("org/tiny", "v2"):
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
    assert str(info.value) == (
        "Lost the connection to the Hub while downloading org/tiny@v2 (LocalEntryNotFoundError)."
        " Check the network, then rerun: files already downloaded stay in the cache."
    )
    assert (info.value.repo_id, info.value.revision, info.value.reason) == ("org/tiny", "v2", "unreachable")


def test_push_refuses_while_offline(merged):
    with pytest.raises(HubError, match=r"^Cannot push while HF_HUB_OFFLINE is set\."):
        publish.push_folder(merged, "user/m", token=WRITE_TOKEN, verify=False)


# ---- reforge push ----------------------------------------------------------------------------------------------
def test_cli_push_prints_the_commit_url(fake_hub, merged):
    result = CliRunner().invoke(
        cli,
        ["push", str(merged), "user/cli", "--token", SECRET.replace("DoNot", "x"), "--skip-verify"],
        env={"HF_TOKEN": None},
    )
    assert result.exit_code == 1 and "user/cli" not in fake_hub.repos  # unknown token: refused
    result = CliRunner().invoke(
        cli, ["push", str(merged), "user/cli", "--token", WRITE_TOKEN, "--skip-verify"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.stderr
    sha = fake_hub.repos["user/cli"].refs["main"]
    assert result.stdout == f"{fake_hub.url}/user/cli/commit/{sha}\n"
    assert WRITE_TOKEN not in result.stdout + result.stderr
    assert fake_hub.repos["user/cli"].private


def test_cli_push_json_public_revision_and_env_token(fake_hub, merged):
    result = CliRunner().invoke(
        cli,
        ["push", str(merged), "user/cli", "--public", "-r", "v1", "-m", "first", "--json", "--skip-verify"],
        env={"HF_TOKEN": WRITE_TOKEN},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    files = _files(merged)
    repo = fake_hub.repos["user/cli"]
    assert json.loads(result.stdout) == {
        "repo_id": "user/cli",
        "revision": "v1",
        "private_requested": False,
        "commit_url": f"{fake_hub.url}/user/cli/commit/{repo.refs['v1']}",
        "files": len(files),
        "bytes": sum(len(b) for b in files.values()),
    }
    assert not repo.private and repo.history[-1][1] == "first"
    assert {r.authorization for r in fake_hub.calls("POST", "/commit/")} == {f"Bearer {WRITE_TOKEN}"}


def test_cli_dry_run_lists_files_and_bytes_and_sends_nothing(fake_hub, merged):
    files = _files(merged)
    result = CliRunner().invoke(cli, ["push", str(merged), "user/dry", "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == sorted(files)
    assert [int(line.split()[1].replace(",", "")) for line in lines[:-1]] == [len(files[k]) for k in sorted(files)]
    total = sum(len(b) for b in files.values())
    assert (
        lines[-1] == f"{len(files)} files, {total:,} bytes -> user/dry@main (private if created). Nothing was "
        "sent (--dry-run)."
    )
    result = CliRunner().invoke(cli, ["push", str(merged), "user/dry@v2", "--dry-run", "--json"])
    data = json.loads(result.stdout)
    assert (data["revision"], data["total_bytes"], len(data["files"])) == ("v2", total, len(files))
    assert fake_hub.requests == []


def test_cli_bad_arguments_exit_2(merged):
    result = CliRunner().invoke(cli, ["push", str(merged), "not a repo"])
    assert result.exit_code == 2 and "'not a repo' is not a Hub repo id; write owner/name" in result.stderr
    result = CliRunner().invoke(cli, ["push", str(merged), "me/m@a", "--revision", "b"])
    assert result.exit_code == 2
    assert (
        "REPO_ID names revision 'a' and --revision names 'b'; give the branch once, with --revision." in result.stderr
    )


def test_cli_errors_are_one_line_without_the_token(fake_hub, merged, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(merged), "user/m", "--token", SECRET, "--skip-verify"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert captured.err == (
        "Error: The Hub refused to let this token write to user/m (HTTP 401). Pass a token with "
        "write access (--token, HF_TOKEN) or run `hf auth login`.\n"
    )
    assert SECRET not in captured.out + captured.err

    (merged / "model-00005-of-00005.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(merged), "user/m", "--token", SECRET])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and captured.out == ""
    assert captured.err == (
        f"Error: {merged} is not ready to push: model-00005-of-00005.safetensors: file is 0 "
        "bytes, too short for a safetensors header. Nothing was uploaded. Rerun the command that wrote it, then "
        "`reforge verify` it.\n"
    )


def test_fake_hub_guard_refuses_other_hosts(fake_hub):
    with pytest.raises(RuntimeError, match=r"^test tried to reach example.invalid; only the fake Hub on 127.0.0.1 is"):
        hub.download_checkpoint("org/tiny", endpoint="http://example.invalid")
    assert fake_hub.requests == []


def test_repo_id_may_carry_the_revision(fake_hub, tiny_model):
    fake_hub.add_folder("org/tiny", tiny_model)
    v2 = fake_hub.commit("org/tiny", {"README.md": b"v2"}, branch="v2")
    assert hub.download_checkpoint("org/tiny@v2").name == v2
    with pytest.raises(InvalidOptionError) as info:
        hub.download_checkpoint("org/tiny@v2", revision="main")
    assert str(info.value) == (
        "org/tiny@v2 names revision 'v2' but revision='main' was also given. Give the revision once."
    )
    with pytest.raises(CheckpointNotFoundError, match=r"^'not a repo' is neither an existing local folder"):
        hub.download_checkpoint("not a repo")
    assert len(fake_hub.calls("GET", r"^/api/models/")) == 1
