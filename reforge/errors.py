"""Every exception reforge raises on purpose.

`ReforgeError` is the base. Each subclass keeps the facts of the failure as fields (``path``, ``tensor``, ...), and
its message says what failed, for which object, and what to do next. Where it fits, a subclass also inherits a
builtin (``FileNotFoundError``, ``ValueError``), so callers can catch either.

The CLI (`reforge.cli.main`) prints ``Error: <message>`` for these and exits 1; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


class ReforgeError(Exception):
    """Base of all reforge errors. ``hint`` is the next step for the user, appended to the message."""

    def __init__(self, message: str, *, hint: str | None = None, **facts: Any) -> None:
        self.message = mask_secrets(message)  # a reference may carry a token (https://u:hf_...@, ?token=)
        self.hint = mask_secrets(hint) if hint is not None else None
        for key, value in facts.items():
            setattr(self, key, value)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class CheckpointNotFoundError(ReforgeError, FileNotFoundError):
    """A checkpoint reference is neither a local folder nor a Hub repo that could be read. Fields: ``ref``."""


class ShardNotFoundError(ReforgeError, FileNotFoundError):
    """An index names a shard file that is not there. Fields: ``path`` (the shard), ``index`` (the index file)."""


class CorruptCheckpointError(ReforgeError, ValueError):
    """A safetensors file is truncated or malformed. Fields: ``path``, ``tensor`` (or None), ``reason``."""


class UnsafePathError(ReforgeError, ValueError):
    """An index file names a path outside its checkpoint folder. Fields: ``index``, ``entry``."""


class PickleRefusedError(ReforgeError):
    """A checkpoint is only available as a pickle and ``allow_pickle`` was not given. Fields: ``path``."""


class LayoutMismatchError(ReforgeError, ValueError):
    """Two checkpoints do not line up: different tensor names, architectures or shapes. Fields: ``left``,
    ``right``, ``tensor`` (or None), ``details``."""


class AdapterError(ReforgeError, ValueError):
    """A peft adapter is unusable: bad config, missing tensors, keys that match nothing. Fields: ``path``,
    ``tensor`` (or None)."""


class NonFiniteError(ReforgeError, ValueError):
    """diff or merge read or produced a NaN or Inf. Fields: ``tensor`` (the output tensor), ``path`` (the output)."""


class ProvenanceMismatchError(ReforgeError, ValueError):
    """An input was made from a different base than the one given. Fields: ``path``, ``expected``, ``found``."""


class OutputExistsError(ReforgeError, FileExistsError):
    """The output folder already holds something else. Fields: ``path``."""


class OutputRefusedError(ReforgeError, ValueError):
    """An output reforge must not write: it is, contains or lies inside an input, is a symlink, a mount point or a
    file, or cannot be written. Checked before any work (`reforge.io.target.check_output`). Fields: ``path``."""


class OutputLockedError(ReforgeError):
    """Another reforge run is writing the same output. Fields: ``path``, ``lock``."""


class DiskFullError(ReforgeError, OSError):
    """The disk filled up (or would) while writing. Fields: ``path``, ``needed`` (bytes or None), ``free``."""


class InvalidOptionError(ReforgeError, ValueError):
    """Options that cannot work together or a value out of range. Fields: ``option``."""


class DataError(ReforgeError, ValueError):
    """A corpus, queries or qrels file is missing or malformed. Fields: ``path``, ``line`` (or None)."""


class VerificationError(ReforgeError):
    """A produced checkpoint failed `reforge verify`. Fields: ``path``, ``failures`` (list of strings)."""


class HubError(ReforgeError):
    """A Hugging Face Hub call failed. Fields: ``repo_id``, ``reason``."""


# Secrets that ride in references and paths: a Hugging Face token (hf_..., api_org_...), a URL's user:password@,
# and a credential in a query string. `mask_secrets` hides them in every ReforgeError message; `find_secret` is what
# `reforge push` refuses to upload. Patterns only ever report where and what kind, never the secret itself.
_SECRETS = (
    ("a Hugging Face token", re.compile(r"(?<![A-Za-z0-9])(?:hf_|api_org_)[A-Za-z0-9]{20,}"), "hf_***"),
    ("credentials in a URL", re.compile(r"(?<=://)[^\s/@:'\"]*:[^\s/@'\"]+@"), "***@"),  # user:password@
    (
        "a token in a URL query",
        re.compile(r"(?<=[?&])((?:access_)?token|api_?key|password|sig(?:nature)?)=[^&\s#'\"]+", re.IGNORECASE),
        r"\1=***",
    ),
)


def mask_secrets(text: str) -> str:
    """``text`` with every token-like string replaced by ``***`` (see `find_secret` for what counts).

    Example:
        >>> mask_secrets("https://u:hf_abcdefghijklmnopqrstuvwxyz0123@hf.co/x?token=s3cret&rev=main")
        'https://***@hf.co/x?token=***&rev=main'
    """
    for _, pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def find_secret(text: str) -> tuple[str, int] | None:
    """The first token-like string in ``text`` as ``(what kind, offset)``, or None; the secret itself is never
    returned, so it cannot end up in a message."""
    found = [(m.start(), kind) for kind, pattern, _ in _SECRETS for m in [pattern.search(text)] if m]
    if not found:
        return None
    offset, kind = min(found)
    return kind, offset


def short_path(path: str | Path) -> str:
    """A path as users typed it or relative to the working directory, for messages. A symlink keeps its own name:
    only the folders above it are resolved (a message about a link must name the link, not its target)."""
    p = Path(path)
    cwd = Path.cwd().resolve()
    for candidate in (Path(os.path.abspath(p)), p.parent.resolve() / p.name):
        try:
            return str(candidate.relative_to(cwd))
        except ValueError:
            continue
    return str(p)


# ---- Hub errors (raised by reforge/io/hub.py and reforge/publish.py) ------------------------------------------------
# Each is also a CheckpointNotFoundError, so code that resolves a checkpoint reference can catch one class.


class HubRepoNotFoundError(HubError, CheckpointNotFoundError):
    """A Hub repo does not exist, or is private or gated and the token (if any) gives no access. Fields: ``repo_id``,
    ``revision`` (or None), ``ref``, ``reason``."""


class HubRevisionNotFoundError(HubError, CheckpointNotFoundError):
    """A Hub repo exists but has no such branch, tag or commit. Fields: ``repo_id``, ``revision``, ``ref``,
    ``reason``."""


class HubOfflineError(HubError, CheckpointNotFoundError):
    """The Hub cannot be reached (HF_HUB_OFFLINE=1 or no network) and the checkpoint is not (wholly) in the local
    cache. Fields: ``repo_id``, ``revision`` (or None), ``ref``, ``reason``, ``missing`` (files not cached)."""


# ---------------------------------------------------------------------------------------------------------------------
# Added by the eval developer (issue 5).


class PoolingUndeterminedError(ReforgeError, ValueError):
    """`reforge eval` cannot tell how a model pools token vectors into one vector (no sentence-transformers files,
    not a known retriever, not a decoder LM). Fields: ``path`` (the model folder), ``model_type`` (or None)."""


# ---------------------------------------------------------------------------------------------------------------------
# Added for issue 14 (model families).


class UnsupportedModelError(ReforgeError, ValueError):
    """A model reforge would otherwise encode or write wrongly: a sentence-transformers module or pooling it does
    not implement, a model that needs its own code without ``--trust-remote-code``, a folder without a tokenizer, a
    chat model given as a retriever without ``--keep-lm-head``. Fields: ``path``, ``reason``."""


# ---------------------------------------------------------------------------------------------------------------------
# Added for issue 26 (nothing reused unless it is the same).


class ResumeError(ReforgeError, ValueError):
    """A training checkpoint that ``--resume`` cannot trust: a file missing, unreadable or not what reforge writes
    (meta.json, optim.pt, an RNG state), or an adapter without every trainable tensor, of the wrong shape, or holding
    a NaN. Fields: ``path`` (the file), ``tensor`` (or None)."""


class RecipeError(ReforgeError, ValueError):
    """A recipe that cannot run: unreadable YAML, an unknown key, a wrong type, a missing input, a cycle, or a step
    that would write over an input. Raised before any step runs. Fields: ``path`` (the recipe), ``line`` (1-based,
    or None), ``key`` (the dotted key, or None)."""


class JobsFailedError(ReforgeError):
    """``reforge run --keep-going`` went on past failed jobs: the run is not whole. Fields: ``failed`` (job ids)."""
