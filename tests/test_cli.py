"""The CLI as a whole: fast help, version, inspect, and error formatting."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from reforge import __version__
from reforge.cli import COMMANDS, cli, format_error
from reforge.errors import CorruptCheckpointError, ShardNotFoundError


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys, time; t=time.perf_counter(); from reforge.cli import main; import reforge.cli; "
        "sys.argv=['reforge','--help']\ntry: main()\nexcept SystemExit: pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', time.perf_counter()-t)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "NO_TORCH" in result.stdout  # the time it takes is measured in bench/, not asserted on a shared machine
    for name in ("diff", "merge", "verify", "inspect"):
        assert name in result.stdout


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_every_command_has_teaching_help():
    runner = CliRunner()
    for name in cli.list_commands(None):
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Examples:" in result.stdout, f"{name} --help shows no examples"
        assert COMMANDS[name][2].rstrip(".") in " ".join(result.stdout.split()), name


def test_inspect_tells_layouts_apart(llama_pair):
    base_dir, retriever_dir = llama_pair
    runner = CliRunner()
    base = json.loads(runner.invoke(cli, ["inspect", str(base_dir), "--json"]).stdout)
    retriever = json.loads(runner.invoke(cli, ["inspect", str(retriever_dir), "--json"]).stdout)
    assert base["layout"] == {"prefix": "model.", "head": ["lm_head.weight"], "bare": False, "tied_embeddings": False}
    assert retriever["layout"]["bare"] and retriever["architecture"] == "LlamaModel"
    assert retriever["dtypes"] == {"BF16": retriever["tensors"]} and len(retriever["files"]) > 1
    table = runner.invoke(cli, ["inspect", str(retriever_dir)])
    assert "bare model (retriever layout)" in table.stdout


def test_error_formatting_walks_the_mro():
    error = ShardNotFoundError(
        "x.safetensors is named by index.json but missing.", hint="Download it.", path="x", index="i"
    )
    assert format_error(error) == "x.safetensors is named by index.json but missing. Download it."
    assert format_error(CorruptCheckpointError("bad.", path="p", tensor=None, reason="r")) == "bad."
    assert format_error(ValueError("a bug")) is None


def test_hub_errors_are_formatted_without_traceback():
    import httpx2 as httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    response = httpx.Response(404, request=httpx.Request("GET", "http://127.0.0.1/api/models/a/b"))
    message = format_error(RepositoryNotFoundError("404 Client Error", response=response))
    assert message.startswith("Hub repository not found") and "--token" in message


def test_reforge_error_is_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "Traceback" not in result.stderr


def test_unknown_error_keeps_its_traceback(tmp_path):
    """An exception reforge does not expect is a bug: main() must not turn it into a tidy one-line message."""
    code = (
        "import sys, reforge.io.describe as d\n"
        "def boom(*a, **k): raise ZeroDivisionError('a bug')\n"
        "d.describe = boom\n"
        "from reforge.cli import main\n"
        f"sys.argv = ['reforge', 'inspect', {str(tmp_path)!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ZeroDivisionError: a bug" in result.stderr
    assert not any(line.startswith("Error: ") for line in result.stderr.splitlines())


def test_where_delta_comes_from_is_checked_once_for_every_command_before_any_file_is_read(tmp_path):
    """merge and verify take --base/--retriever/--delta from one declaration (options.source_options) with one
    check; --adapter/--alpha likewise (adapter_options)."""
    runner = CliRunner()
    both = ["--retriever", "r", "--delta", str(tmp_path)]
    cases = [
        (["merge", "--base", "b", "-o", str(tmp_path / "o")], "Pass exactly one of --retriever and --delta."),
        (["merge", "--base", "b", *both, "-o", str(tmp_path / "o")], "Pass exactly one of --retriever and --delta."),
        (["verify", str(tmp_path), *both], "Pass at most one of --retriever and --delta (without either, the ones"),
        (["verify", str(tmp_path), "--alpha", "0.3"], "0 --adapter but 1 --alpha: give one --alpha per --adapter"),
        (
            ["merge", "--base", "b", "--retriever", "r", "--adapter", "a", "--alpha", "1", "--alpha", "2", "-o", "o"],
            "1 --adapter but 2 --alpha: give one --alpha per --adapter, or none for 0.5 each.",
        ),
    ]
    for args, message in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_every_max_shard_size_is_one_declaration_whose_default_is_the_librarys():
    """--max-shard-size is declared once (options.max_shard_size_option: diff, merge, tune --write) and its 5GB is
    `WriteOptions`' default, which tune's write_best takes as a whole option group, not as loose arguments."""
    import inspect

    from reforge.cli.options import SizeType
    from reforge.ops.job import WriteOptions
    from reforge.tune import write_best

    with_option = []
    for name in cli.list_commands(None):
        command = cli.get_command(None, name)
        option = next((p for p in command.params if p.name == "max_shard_size"), None)
        if option is not None:
            with_option.append(name)
            assert SizeType().convert(option.default, None, None) == WriteOptions().max_shard_size == 5 * 10**9
    assert {"diff", "merge", "tune"} <= set(with_option)
    assert inspect.signature(write_best).parameters["write"].default == WriteOptions()
