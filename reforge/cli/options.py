"""Option bundles and parameter types shared by several commands."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import click

from reforge.ops.defaults import PAPER_ALPHA
from reforge.profiles import PROFILE_NAMES

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """Parse ``5GB``, ``500MB``, ``2GiB`` or a plain byte count into bytes (``GB`` = 10**9, ``GiB`` = 2**30)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
    number, unit = match.groups()
    size = int(float(number) * _SIZE_UNITS[unit or ""])
    if size <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return size


class SizeType(click.ParamType):
    """A byte size such as ``5GB`` (10**9 bytes), ``500MB`` or ``2GiB``."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class DeviceType(click.ParamType):
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:1``, ``mps``. Checked at parse time, so a typo or
    a GPU the build lacks fails before any model is read."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        import torch

        try:
            device = torch.device(str(value))
        except (RuntimeError, ValueError):
            self.fail(f"{value!r} is not a torch device; use cpu, cuda, cuda:N or mps.", param, ctx)
        if device.type == "cuda":
            if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
                self.fail(
                    f"{value!r}: this torch build has no CUDA support (a CPU build); use cpu, or install a "
                    "CUDA build of torch.",
                    param,
                    ctx,
                )
            count = torch.cuda.device_count()
            if count == 0 or (device.index is not None and device.index >= count):
                self.fail(f"{value!r}: {count} CUDA device(s) visible here.", param, ctx)
        elif device.type == "mps" and not torch.backends.mps.is_available():
            self.fail(f"{value!r}: MPS is not available on this machine.", param, ctx)
        elif device.type not in ("cpu", "cuda", "mps"):
            self.fail(f"{value!r}: reforge runs on cpu, cuda or mps.", param, ctx)
        return str(value)


class StreamDeviceType(DeviceType):
    """``auto`` (a GPU when there is one, decided when the command runs) or a cpu/cuda device this machine has."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if str(value) == "auto":
            return "auto"
        device = super().convert(value, param, ctx)
        if device.split(":")[0] not in ("cpu", "cuda"):
            self.fail(f"{value!r}: diff, merge and verify run on cpu or cuda (or auto).", param, ctx)
        return device


def stream_device_option(func: Callable) -> Callable:
    """``--device`` of diff, merge and verify: where the arithmetic runs (`reforge.ops.device`)."""
    return click.option(
        "--device",
        type=StreamDeviceType(),
        default="cpu",
        show_default=True,
        help="Where the arithmetic runs: cpu, cuda (cuda:N), or auto = cuda when available. The CPU is the default "
        "until the GPU path has been measured on a GPU. Pieces stream "
        "through the GPU; diff and merges without a DoRA adapter are elementwise and should give the CPU's bytes "
        "(not yet run on a GPU), a DoRA product or row norm may round differently there.",
    )(func)


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


def output_options(func: Callable) -> Callable:
    """``--quiet`` and ``--json``: how results and progress are shown."""
    func = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="No progress bars (warnings and errors still print).")(func)
    return func


def log_file_option(func: Callable) -> Callable:
    """``--log-file``: keep the plain progress lines of a long command (see `reforge.cli.output.progress_bar`)."""
    return click.option(
        "--log-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Append progress lines (stage, counts, rate, ETA; every $REFORGE_PROGRESS_EVERY s, 30) to this file.",
    )(func)


def hub_options(func: Callable) -> Callable:
    """``--token`` and ``--allow-pickle``: how checkpoints are fetched and opened."""
    func = click.option(
        "--allow-pickle",
        is_flag=True,
        help="Accept pickle checkpoints (.bin); loaded with torch.load(weights_only=True).",
    )(func)
    func = click.option(
        "--token",
        envvar="HF_TOKEN",
        default=None,
        show_envvar=True,
        help="Hugging Face token for private repos (default: the one `hf auth login` saved).",
    )(func)
    return func


def write_options(func: Callable) -> Callable:
    """``-o/--output``, ``--max-shard-size``, ``--overwrite`` and ``--dry-run`` for commands that write checkpoints."""
    func = click.option("--dry-run", is_flag=True, help="Print the plan (tensors, shards, bytes) and write nothing.")(
        func
    )
    func = click.option(
        "--durable",
        is_flag=True,
        help="fsync each shard before it is renamed: a kept shard then "
        "survives a power loss, not only a crash (writes at disk speed).",
    )(func)
    func = click.option(
        "--overwrite", is_flag=True, help="Replace an output folder that already holds a different checkpoint."
    )(func)
    func = max_shard_size_option()(func)
    func = click.option(
        "-o",
        "--output",
        required=True,
        type=click.Path(file_okay=False),
        help="Output folder (written under a temporary name, renamed when whole).",
    )(func)
    return func


def max_shard_size_option(text: str = "Largest shard file, in bytes (5GB = 5*10**9).") -> Callable:
    """``--max-shard-size`` of every command that writes a checkpoint (`write_options`; tune's ``--write``): 5GB,
    `reforge.ops.job.WriteOptions`' default."""
    return click.option("--max-shard-size", type=SizeType(), default="5GB", show_default=True, help=text)


def source_options(*, recorded: bool = False) -> Callable[[Callable], Callable]:
    """``--base``, ``--retriever`` and ``--delta``: what a readapted retriever is built from (merge, tune, verify),
    declared once, with the one check on them (`check_source_flags`) run before the command's body.

    ``recorded=False`` (merge, tune): ``--base`` is required, and exactly one of ``--retriever`` / ``--delta``.
    ``recorded=True`` (verify): each defaults to what the checked folder's ``reforge.json`` records; at most one of
    ``--retriever`` / ``--delta``.
    """
    record = " (default: the one the folder's reforge.json records)" if recorded else ""
    options = [
        click.option(
            "--base",
            required=not recorded,
            default=None,
            help="The pretrained LM the retriever and the adapters were trained from" + record + ".",
        ),
        click.option(
            "--retriever",
            default=None,
            help="The retriever (full, or a peft LoRA over BASE)"
            + (
                record
                if recorded
                else ". Delta is computed on the fly; with --beta 1 the output is retriever + alpha*Psi with no "
                "Delta rounding"
            )
            + ".",
        ),
        click.option(
            "--delta",
            default=None,
            type=click.Path(exists=True, file_okay=False),
            help="A delta folder from `reforge diff`, instead of --retriever" + record + ".",
        ),
    ]

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def checked(*args: Any, **kwargs: Any) -> Any:
            check_source_flags(kwargs.get("retriever"), kwargs.get("delta"), recorded=recorded)
            return func(*args, **kwargs)

        for option in reversed(options):
            checked = option(checked)
        return checked

    return decorate


def check_source_flags(retriever: str | None, delta: str | None, *, recorded: bool = False) -> None:
    """The command line's one check on where Delta comes from (`source_options`); the library's own is
    `reforge.ops.job.check_source`.

    Raises:
        click.UsageError: both given; or neither, unless the folder's record supplies them (``recorded``).
    """
    if retriever is not None and delta is not None:
        raise click.UsageError(
            "Pass at most one of --retriever and --delta (without either, the ones reforge.json records)."
            if recorded
            else "Pass exactly one of --retriever and --delta."
        )
    if retriever is None and delta is None and not recorded:
        raise click.UsageError("Pass exactly one of --retriever and --delta.")


def adapter_options(*, recorded: bool = False) -> Callable[[Callable], Callable]:
    """``--adapter`` (repeatable) and ``--alpha`` (one per adapter, in order): the knowledge adapters of a merge
    (merge; verify with ``recorded``: default, those the folder's ``reforge.json`` records). `adapter_pairs` turns
    them into ``[(adapter, alpha), ...]``."""
    record = "; default: those the folder's reforge.json records" if recorded else ""

    def decorate(func: Callable) -> Callable:
        func = click.option(
            "--alpha",
            "alphas",
            multiple=True,
            type=float,
            help=f"Weight of each --adapter, in the same order (default {PAPER_ALPHA:g} each).",
        )(func)
        return click.option(
            "--adapter",
            "adapters",
            multiple=True,
            help="A knowledge adapter (peft DoRA/LoRA folder from `reforge train`). Repeat for several" + record + ".",
        )(func)

    return decorate


def keep_lm_head_option(func: Callable) -> Callable:
    """``--keep-lm-head`` of diff and merge (RE-Adapt of a chat model)."""
    return click.option(
        "--keep-lm-head",
        is_flag=True,
        help="RE-Adapt a chat model: the retriever is an instruction-tuned CausalLM; keep its lm_head and write a "
        "CausalLM (diff and merge both need it).",
    )(func)


def adapter_pairs(adapters: tuple[str, ...], alphas: tuple[float, ...]) -> list[tuple[str, float]]:
    """``[(adapter, alpha), ...]`` from `adapter_options`; alpha `reforge.ops.defaults.PAPER_ALPHA` (0.5) each when
    no ``--alpha`` is given.

    Raises:
        click.UsageError: some ``--alpha`` given, but not one per ``--adapter``.
    """
    if alphas and len(alphas) != len(adapters):
        raise click.UsageError(
            f"{len(adapters)} --adapter but {len(alphas)} --alpha: give one --alpha per --adapter, or none for "
            f"{PAPER_ALPHA:g} each."
        )
    return list(zip(adapters, alphas or [PAPER_ALPHA] * len(adapters)))


PROFILES = list(PROFILE_NAMES)  # one home: reforge.profiles


class MetricType(click.ParamType):
    """An ir-measures name such as ``nDCG@10``, checked at parse time."""

    name = "metric"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from reforge.errors import InvalidOptionError
        from reforge.eval.metrics import parse_measures

        try:
            return str(parse_measures([str(value)])[0])
        except InvalidOptionError as e:
            self.fail(str(e), param, ctx)


def encoding_options(func: Callable) -> Callable:
    """How texts become vectors and runs become scores: shared by `reforge eval` and `reforge tune`."""
    options = [
        click.option(
            "--averaging",
            type=click.Choice(["beir", "all"]),
            default="beir",
            show_default=True,
            help="beir: mean over queries with results; all: over every judged query, none = 0 (trec_eval -c).",
        ),
        click.option(
            "--top-k", type=click.IntRange(min=1), default=1000, show_default=True, help="Hits kept per query."
        ),
        click.option(
            "--keep-identical-ids",
            is_flag=True,
            help="Keep hits whose doc id equals the query id (BEIR drops them; matters for ArguAna, Quora).",
        ),
        click.option(
            "--profile",
            type=click.Choice(PROFILES),
            default=None,
            help="Encoding convention (default: detected from the model's files; see docs/eval.md).",
        ),
        click.option(
            "--pooling", type=click.Choice(["mean", "cls", "last"]), default=None, help="Override the pooling."
        ),
        click.option(
            "--query-prefix", default=None, help="Text before each query ('\\n' = newline; '{task}' = e5 task)."
        ),
        click.option("--passage-prefix", default=None, help="Text before each passage ('\\n' = newline)."),
        click.option("--task", default=None, help="Task instruction filling '{task}' (e5-mistral), for any dataset."),
        click.option(
            "--max-length", type=click.IntRange(min=2), default=None, help="Tokens per text (default: profile's)."
        ),
        click.option("--normalize/--no-normalize", default=None, help="L2-normalize vectors (default: profile's)."),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=None, help="Texts per batch [32 CPU, 64 GPU]."
        ),
        click.option("--device", type=DeviceType(), default=None, help="cpu, cuda, cuda:1 ... [cuda when available]."),
        click.option(
            "--dtype",
            type=click.Choice(DTYPE_CHOICES),
            default="auto",
            show_default=True,
            help="auto = float32 on CPU, bfloat16 (or float16) on GPU.",
        ),
        click.option(
            "--embedding-dtype",
            type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
            default="auto",
            show_default=True,
            help="How corpus vectors are stored and searched: auto = float16 from 1024 dimensions up, else float32.",
        ),
        click.option(
            "--shard-docs",
            type=click.IntRange(min=1),
            default=65_536,
            show_default=True,
            help="Documents per embedding shard in the cache (an encode resumes at the first missing shard).",
        ),
        click.option("--no-cache", is_flag=True, help="Neither read nor write the embedding cache."),
        click.option(
            "--trust-remote-code",
            is_flag=True,
            help="Run a model's own Python code (config auto_map, e.g. NV-Embed-v2, gte-Qwen2); refused without it.",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Embedding cache folder [$REFORGE_HOME/cache/embeddings].",
        ),
        click.option(
            "--permutations",
            type=click.IntRange(min=1),
            default=10_000,
            show_default=True,
            help="Sign flips in the randomization test.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sample_options(func: Callable) -> Callable:
    """``--max-queries`` and ``--corpus-sample``: score a seeded sample of a dataset
    (`reforge.data.beir.sample_dataset`), shared by eval and tune."""
    options = [
        click.option(
            "--max-queries",
            type=click.IntRange(min=1),
            default=None,
            help="Score a seeded random sample of N judged queries.",
        ),
        click.option(
            "--corpus-sample",
            type=click.IntRange(min=1),
            default=None,
            help="Search a corpus of about N documents: every judged one plus a seeded random sample.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def encoding_settings(options: dict, **extra: Any) -> Any:
    """The `reforge.eval.EvalSettings` that `encoding_options` (plus ``extra`` fields) describe."""
    from reforge.eval import EvalSettings

    return EvalSettings(
        averaging=options["averaging"],
        top_k=options["top_k"],
        keep_identical_ids=options["keep_identical_ids"],
        profile=options["profile"],
        pooling=options["pooling"],
        query_prefix=_unescape(options["query_prefix"]),
        passage_prefix=_unescape(options["passage_prefix"]),
        task=options["task"],
        max_length=options["max_length"],
        normalize=options["normalize"],
        batch_size=options["batch_size"],
        device=options["device"],
        dtype=None if options["dtype"] == "auto" else options["dtype"],
        cache=not options["no_cache"],
        cache_dir=options["cache_dir"],
        embedding_dtype=None if options["embedding_dtype"] == "auto" else options["embedding_dtype"],
        shard_docs=options["shard_docs"],
        permutations=options["permutations"],
        trust_remote_code=options["trust_remote_code"],
        **extra,
    )


def _unescape(text: str | None) -> str | None:
    """``\\n`` and ``\\t`` typed on a command line become a newline and a tab (e5 prompts need them)."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")
