"""Secrets never leave: `reforge push` refuses a folder holding a token-like string (naming the file, never the
token), and a token inside a model reference is masked in every error message (issue 26)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import build_model, save
from reforge import publish
from reforge.cli import cli
from reforge.errors import CheckpointNotFoundError, VerificationError, find_secret, mask_secrets

TOKEN = "hf_" + "Zq3xVb7NpLm2Kd9RtYw4Hs6Jf8Gc1Ae5Ui"  # the shape of a real user access token, made up


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    folder = save(build_model("llama-causal"), tmp_path_factory.mktemp("push") / "model")
    (folder / "README.md").write_text("# a model\n", encoding="utf-8")
    return folder


@pytest.fixture
def folder(clean, tmp_path):
    return shutil.copytree(clean, tmp_path / "model")


def _refused(folder, *fragments):
    with pytest.raises(VerificationError) as caught:
        publish.push_folder(folder, "user/m", token="hf_write")
    text = str(caught.value) + " ".join(caught.value.failures)
    assert TOKEN not in text and TOKEN[3:] not in text and "Nothing was uploaded" in text
    for fragment in fragments:
        assert fragment in text, text
    return caught.value


def test_a_clean_folder_has_no_secret_failures(clean):
    assert publish.secret_failures(clean) == []


def test_push_refuses_a_token_in_a_text_file_naming_the_file(folder):
    text = "# a model\n\nTrained with HF_TOKEN=" + TOKEN + "\n"
    (folder / "README.md").write_text(text, encoding="utf-8")
    error = _refused(folder, "README.md holds a Hugging Face token")
    assert error.failures == [
        f"README.md holds a Hugging Face token at byte {text.index(TOKEN)} (it would be uploaded as it is)"
    ]


def test_push_refuses_a_token_like_folder_name_recorded_in_a_record(folder):
    record = {"base": {"ref": "/home/u/" + TOKEN + "/Llama-2-7b-hf", "path": "/home/u/" + TOKEN + "/Llama-2-7b-hf"}}
    (folder / "training_record.json").write_text(json.dumps(record), encoding="utf-8")
    _refused(folder, "training_record.json holds a Hugging Face token")


def test_push_refuses_a_url_with_credentials_or_a_query_token(folder):
    (folder / "adapter_note.json").write_text('{"base": "https://user:pass@example.org/m"}', encoding="utf-8")
    _refused(folder, "adapter_note.json holds credentials in a URL")
    (folder / "adapter_note.json").write_text('{"base": "https://example.org/m?token=abc"}', encoding="utf-8")
    _refused(folder, "adapter_note.json holds a token in a URL query")


def test_push_refuses_a_token_in_safetensors_metadata(folder):
    save_file({"x": torch.zeros(2)}, folder / "extra.safetensors", metadata={"format": "pt", "reforge_base": TOKEN})
    _refused(folder, "extra.safetensors holds a Hugging Face token")


def test_push_refuses_a_token_in_a_file_name_without_printing_it(folder):
    (folder / f"notes-{TOKEN}.txt").write_text("nothing here", encoding="utf-8")
    _refused(folder, "the file name 'notes-hf_***.txt' holds a Hugging Face token")


def test_a_token_across_two_read_blocks_is_found(folder):
    text = "x" * ((1 << 20) - 11) + " " + TOKEN + "\n"  # starts 10 bytes before the first 1 MiB block ends
    (folder / "log.txt").write_text(text, encoding="utf-8")
    assert publish.secret_failures(folder) == [
        f"log.txt holds a Hugging Face token at byte {(1 << 20) - 10} (it would be uploaded as it is)"
    ]


def test_the_cli_dry_run_lists_the_refusal(folder):
    (folder / "README.md").write_text(f"token {TOKEN}\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["push", str(folder), "user/m", "--dry-run"])
    assert TOKEN not in result.output and TOKEN not in result.stderr
    assert "README.md holds a Hugging Face token" in result.output + result.stderr


# ---- masking --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"https://user:{TOKEN}@huggingface.co/org/m", "https://***@huggingface.co/org/m"),
        (f"https://{TOKEN}@huggingface.co/org/m", "https://hf_***@huggingface.co/org/m"),
        ("ssh://git@github.com/org/repo.git", "ssh://git@github.com/org/repo.git"),  # a user name is no secret
        (
            "https://huggingface.co/org/m?token=s3cret&revision=main",
            "https://huggingface.co/org/m?token=***&revision=main",
        ),
        (f"org/m?access_token={TOKEN}", "org/m?access_token=***"),
        (f"/data/{TOKEN}/base", "/data/hf_***/base"),
        ("meta-llama/Llama-2-7b-hf@main", "meta-llama/Llama-2-7b-hf@main"),
        ("model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_A.weight"),
    ],
)
def test_mask_secrets(text, masked):
    assert mask_secrets(text) == masked
    assert (find_secret(text) is None) == (text == masked)


def test_every_reforge_error_masks_a_token_in_its_message():
    error = CheckpointNotFoundError(f"{TOKEN} is missing.", hint=f"Try https://u:{TOKEN}@x/y.", ref=TOKEN)
    assert TOKEN not in str(error) and str(error) == "hf_*** is missing. Try https://***@x/y."
    assert error.ref == TOKEN  # the fact itself is kept for code; only messages are masked


@pytest.mark.parametrize(
    "ref", [f"https://user:{TOKEN}@huggingface.co/org/m", f"https://huggingface.co/org/m?token={TOKEN}"]
)
@pytest.mark.parametrize("command", [["inspect"], ["train", "--corpus", "."]])
def test_a_token_in_a_model_reference_is_masked_in_cli_messages(ref, command, tmp_path):
    args = [command[0], ref, *command[1:]] + (["-o", str(tmp_path / "out")] if command[0] == "train" else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert TOKEN not in result.output + result.stderr
    assert "***" in result.stderr, result.stderr


# ---- a link's message names the link and where it points (issue 26) -------------------------------------------------


def test_a_link_out_of_the_folder_is_named_with_its_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outside").mkdir()
    save_file({"a": torch.zeros(2)}, tmp_path / "outside" / "x.safetensors")
    for name in ("ck", "ck2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "ck" / "model.safetensors").symlink_to("../outside/x.safetensors")
    (tmp_path / "ck2" / "sub").symlink_to("../outside")
    (tmp_path / "ck2" / "model.safetensors.index.json").write_text('{"weight_map": {"a": "sub/x.safetensors"}}')
    first = CliRunner().invoke(cli, ["inspect", "ck"])
    assert first.exit_code == 1
    assert " ".join(first.stderr.split()).startswith(  # on main: "outside/x.safetensors (shard of ck) resolves to"
        "Error: ck/model.safetensors (shard of ck) resolves to "
        f"{tmp_path / 'outside' / 'x.safetensors'} through the link ck/model.safetensors -> ../outside/x.safetensors, "
        "outside the checkpoint folder."
    )
    second = CliRunner().invoke(cli, ["inspect", "ck2"])
    assert "ck2/sub/x.safetensors (shard of ck2) resolves to" in " ".join(second.stderr.split())
    assert "through the link ck2/sub -> ../outside, outside" in " ".join(second.stderr.split())
