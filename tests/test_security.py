"""Security: no secret or local path is ever written or published; symlinks never carry outside files in.

Each test here failed on main at be54a18 (issue 13).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tune import setup  # noqa: F401  (the module-scoped fixture)

from conftest import run
from fakehub import FakeHub, fake_hub_fixture
from reforge.cli.output import redact_arguments

pytestmark = pytest.mark.usefixtures("one_thread")

SECRET = "s3cr3t-token-that-is-not-hf-shaped-4711"  # not hf_...: the --token rule itself must drop it


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    yield from fake_hub_fixture(tmp_path, monkeypatch)


def _use_token(way: str, monkeypatch) -> list[str]:
    """The arguments that pass the token ``way``; for ``env``, HF_TOKEN is set instead."""
    if way == "env":
        monkeypatch.setenv("HF_TOKEN", SECRET)
    return {"flag": ["--token", SECRET], "equals": [f"--token={SECRET}"], "env": []}[way]


def _leaks(folder: Path, needles: list[str]) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(folder)}: {n!r}" for n in needles if n.encode() in data]
    return found


def merge_args(folders, out, *extra, retriever=None):
    """`reforge merge` of the `setup` fixture's base, retriever (or ``retriever``) and adapter into ``out``."""
    retriever = retriever or folders["retriever"]
    return [
        "merge",
        "--base",
        folders["base"],
        "--retriever",
        retriever,
        "--adapter",
        folders["psi"],
        "-o",
        out,
        *extra,
    ]


@pytest.mark.parametrize("way", ["flag", "equals", "env"])
def test_no_output_of_diff_merge_or_tune_holds_the_token_or_a_local_path(
    setup,  # noqa: F811
    tmp_path,
    way,
    monkeypatch,
):
    token_args = _use_token(way, monkeypatch)
    out = tmp_path.resolve()
    run("diff", setup["base"], setup["retriever"], "-o", out / "delta", *token_args, "-q")
    run(*merge_args(setup, out / "merged", *token_args, "-q"))
    run(
        "tune",
        "--base",
        setup["base"],
        "--retriever",
        setup["retriever"],
        "--adapter",
        setup["psi"],
        "-d",
        setup["data"],
        "--alpha",
        "0.5",
        "--no-plot",
        "--write",
        out / "tuned",
        *token_args,
        "-q",
    )
    for name in ("delta", "merged", "tuned"):
        manifest = json.loads((out / name / "reforge.json").read_text())
        command = manifest.get("command") or manifest.get("provenance", {}).get("command")
        assert command and command.startswith("reforge "), manifest.keys()
        assert "--token" not in command and str(setup["root"]) not in command, command
        assert " base " in f" {command} " or "--base base" in command, command  # folder names stay
        assert _leaks(out / name, [SECRET]) == [], name
    card = (out / "merged" / "README.md").read_text()
    assert str(setup["root"]) not in card and str(out) not in card  # the card is public: folder names only
    assert "reforge merge --base base --retriever retriever --adapter psi -o merged" in card


@pytest.mark.parametrize("way", ["flag", "equals", "env"])
def test_push_publishes_no_token(setup, tmp_path, way, monkeypatch):  # noqa: F811
    token_args = _use_token(way, monkeypatch)
    out = tmp_path.resolve()
    run(*merge_args(setup, out / "merged", *token_args, "-q"))
    with FakeHub(tokens={SECRET: "user"}) as hub, hub.guard():
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        result = run("push", out / "merged", "user/readapted", *token_args, "--skip-verify")
        files = hub.files("user/readapted")
        assert "reforge.json" in files and "README.md" in files
        assert [name for name, data in files.items() if SECRET.encode() in data] == []
        assert SECRET not in result.output + result.stderr
        assert {r.authorization for r in hub.requests} >= {f"Bearer {SECRET}"}  # it was used, not published


def test_redaction_rules():
    argv = [
        "merge",
        "--base",
        "/home/me/models/base/",
        "--token",
        "abc",
        "--token=def",
        "-o",
        "/srv/out",
        "--adapter=/a/b/psi",
        "rel/psi",
        "--message",
        "uses hf_abcdefghijklmnopqrstu1234",
        "https://u:pw@example.com/org/model?token=s3cret",
        "~/data/scifact",
    ]
    assert redact_arguments(argv) == [
        "merge",
        "--base",
        "base",
        "-o",
        "out",
        "--adapter=psi",
        "rel/psi",
        "--message",
        "uses hf_***",
        "https://***@example.com/org/model?token=***",
        "scifact",
    ]


# ---- symlinks and companion files ------------------------------------------------------------------------------
def _copy_folder(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_shard_symlinked_outside_the_folder_is_refused(setup, tmp_path):  # noqa: F811
    from reforge.errors import UnsafePathError
    from reforge.io.index import ShardIndex

    retriever = _copy_folder(setup["retriever"], tmp_path / "retriever")
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = sorted(retriever.glob("model-0000*.safetensors"))[0]
    shard.rename(outside / shard.name)
    shard.symlink_to(outside / shard.name)
    with pytest.raises(UnsafePathError, match="outside the checkpoint folder"):
        ShardIndex.from_dir(retriever)
    result = run(*merge_args(setup, tmp_path / "out", retriever=retriever), ok=False)
    assert result.exit_code == 1 and "outside the checkpoint folder" in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()
    inside = tmp_path / "inside"  # a symlink within the folder is fine
    _copy_folder(setup["retriever"], inside)
    target = sorted(inside.glob("model-0000*.safetensors"))[0]
    target.rename(inside / "real.bin-part")
    target.symlink_to("real.bin-part")
    assert len(ShardIndex.from_dir(inside).tensors) == len(ShardIndex.from_dir(setup["retriever"]).tensors)


def test_index_paths_through_a_symlinked_folder_are_refused(setup, tmp_path):  # noqa: F811
    from reforge.errors import UnsafePathError
    from reforge.io.index import ShardIndex

    retriever = _copy_folder(setup["retriever"], tmp_path / "retriever")
    outside = tmp_path / "outside"
    outside.mkdir()
    index_file = retriever / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for shard in set(index["weight_map"].values()):
        (retriever / shard).rename(outside / shard)
    (retriever / "shards").symlink_to(outside)
    index["weight_map"] = {k: f"shards/{v}" for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    with pytest.raises(UnsafePathError, match="outside the checkpoint folder"):
        ShardIndex.from_dir(retriever)


def test_only_the_companion_files_a_model_needs_are_copied(setup, tmp_path):  # noqa: F811
    from reforge.errors import UnsafePathError

    secrets = tmp_path / "home" / ".ssh"
    secrets.mkdir(parents=True)
    (secrets / "id_rsa").write_text("PRIVATE KEY")
    retriever = _copy_folder(setup["retriever"], tmp_path / "retriever")
    (retriever / "extras").symlink_to(secrets)
    (retriever / "notes").mkdir()
    (retriever / "notes" / "todo.txt").write_text("private notes")
    (retriever / "modeling_evil.py").write_text("import os; os.system('echo pwned')")
    (retriever / "reforge-base.json").write_text('{"unrelated": true}')  # issue 17: not carried over
    (retriever / "training.json").write_text('{"unrelated": true}')
    (retriever / "1_Pooling").mkdir()
    (retriever / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    out = tmp_path / "out"
    run("merge", "--base", setup["base"], "--retriever", retriever, "--adapter", setup["psi"], "-o", out, "-q")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "tokenizer.json", "1_Pooling/config.json"} <= names
    assert not {n for n in names if n.startswith(("extras", "notes")) or n.endswith(".py")}, names
    assert not {"reforge-base.json", "training.json"} & names
    assert _leaks(out, ["PRIVATE KEY", "private notes", "pwned"]) == []

    (retriever / "tokenizer.json").rename(tmp_path / "tokenizer.json")  # a companion that leaves the folder
    (retriever / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    result = run(*merge_args(setup, tmp_path / "out2", retriever=retriever), ok=False)
    assert result.exit_code == 1 and "tokenizer.json" in result.stderr and "outside the checkpoint" in result.stderr
    with pytest.raises(UnsafePathError):
        from reforge.io.companions import companion_files

        companion_files(retriever)


def test_a_fifo_named_as_a_shard_is_not_called_missing(setup, tmp_path):  # noqa: F811
    import os

    from reforge.errors import CorruptCheckpointError
    from reforge.io.index import ShardIndex

    retriever = _copy_folder(setup["retriever"], tmp_path / "retriever")
    shard = sorted(retriever.glob("model-0000*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(CorruptCheckpointError, match="is a FIFO, not a file"):
        ShardIndex.from_dir(retriever)


# ---- a Hub that never answers -------------------------------------------------------------------------------------
@pytest.fixture
def silent_hub(monkeypatch, tmp_path):
    """An endpoint on 127.0.0.1 that accepts connections (the kernel's backlog does) and never answers."""
    import socket

    from huggingface_hub import constants

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("REFORGE_HUB_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("REFORGE_HUB_READ_TIMEOUT", "0.3")
    monkeypatch.setenv("REFORGE_HUB_RETRIES", "2")
    monkeypatch.setenv("REFORGE_HUB_BACKOFF", "0.05")
    yield server
    server.close()


def test_a_hub_that_never_answers_fails_fast_with_a_clear_message(silent_hub, setup, tmp_path):  # noqa: F811
    import time

    cases = [
        (["inspect", "org/model"], "did not answer within 0.3 s (3 tries"),
        (["diff", setup["base"], "org/retriever", "-o", tmp_path / "delta"], "did not answer within 0.3 s (3 tries"),
        (
            ["push", setup["retriever"], "me/model", "--skip-verify", "--token", SECRET],
            "Could not push me/model: the Hub did not answer within 0.3 s (3 tries",
        ),
    ]
    for args, message in cases:
        started = time.monotonic()
        result = run(*args, ok=False)
        took = time.monotonic() - started
        text = " ".join(result.stderr.split())
        assert result.exit_code == 1 and message in text and "Traceback" not in result.output, (args, text)
        assert took < 20, (args, took)  # 280 s on main at be54a18
        assert SECRET not in text


def test_retrying_backs_off_only_on_retryable_errors():
    import httpx2

    from reforge.io.http import HubLimits, retrying

    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise httpx2.ReadTimeout("slow")
        return "ok"

    assert retrying(flaky, HubLimits(retries=3, backoff=0.5), sleep=waits.append) == "ok" and waits == [0.5, 1.0]
    with pytest.raises(ValueError):
        retrying(lambda: (_ for _ in ()).throw(ValueError("a bug")), HubLimits(retries=3), sleep=waits.append)
    assert waits == [0.5, 1.0]  # not retried


def test_push_refuses_a_folder_with_symlinks_leading_out(setup, tmp_path):  # noqa: F811
    import shutil

    secret = tmp_path / "home" / ".ssh"
    secret.mkdir(parents=True)
    (secret / "id_rsa").write_text("PRIVATE KEY")
    out = tmp_path / "out"
    run("merge", "--base", setup["base"], "--retriever", setup["retriever"], "--adapter", setup["psi"], "-o", out, "-q")
    (out / "extras").symlink_to(secret)
    (out / "key.txt").symlink_to(secret / "id_rsa")
    result = run("push", out, "me/model", "--dry-run", ok=False)
    text = " ".join(result.stdout.split() + result.stderr.split())
    assert result.exit_code == 1 and "outside the folder" in text, text
    (out / "key.txt").unlink()
    (out / "extras").unlink()
    shutil.copy(secret / "id_rsa", out / "notes.txt")  # a real file inside is the user's choice
    assert run("push", out, "me/model", "--dry-run").exit_code == 0
