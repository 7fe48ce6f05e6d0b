"""Every Hub request bounded in time, retried with backoff when a retry can help, and each retry said.

huggingface_hub's shared HTTP client has no timeout (``timeout=None``): an endpoint that accepts the connection and
never answers held `reforge inspect` for 280 s. Inside `bounded`, that client gets connect and read timeouts:
huggingface_hub's own for metadata calls (``HF_HUB_ETAG_TIMEOUT``, 10 s: what it allows a HEAD or an API call),
60 s for uploads. `retrying` repeats a call that timed out, lost its connection or got 429/5xx, waiting 1 s, 2 s,
4 s ... between tries, logs a warning before each retry (the CLI prints it, even with ``--quiet``), and does not
start a try that could not end within the deadline: a silent endpoint fails in under 60 s (10 + 1 + 10 + 2 + 10 +
4 + 10 = 47 s). The limits come from the environment, read at call time:

    REFORGE_HUB_CONNECT_TIMEOUT  seconds to open a connection          (default: HF_HUB_ETAG_TIMEOUT, 10)
    REFORGE_HUB_READ_TIMEOUT     seconds to wait for the next bytes     (default: HF_HUB_ETAG_TIMEOUT, 10;
                                                                         60 for uploads)
    REFORGE_HUB_RETRIES          extra tries after a retryable failure  (default 3)
    REFORGE_HUB_BACKOFF          first wait between tries, doubling     (default 1)
    REFORGE_HUB_DEADLINE         seconds a metadata call may take, tries and waits together (default 60)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from reforge.errors import InvalidOptionError

T = TypeVar("T")
RETRYABLE_STATUS = (429, 500, 502, 503, 504)
UPLOAD_READ_TIMEOUT = 60.0  # an upload's commit may take a while to answer; a metadata call may not
LOGGER = "reforge.hub"  # retry warnings go here; `reforge.cli` prints them as warnings


@dataclass(frozen=True)
class HubLimits:
    """How long a Hub request may take and how often it is tried. ``connect`` and ``read`` None: huggingface_hub's
    own timeout for metadata calls (``constants.HF_HUB_ETAG_TIMEOUT``); ``deadline``: the most seconds one
    `retrying` call of a metadata request may take, its tries and waits together."""

    connect: float | None = None
    read: float | None = None
    retries: int = 3
    backoff: float = 1.0
    deadline: float = 60.0

    @classmethod
    def from_env(cls) -> "HubLimits":
        """The limits set in the environment (see the module docstring), defaults for the rest."""
        values = {}
        for field, name, kind in (
            ("connect", "REFORGE_HUB_CONNECT_TIMEOUT", float),
            ("read", "REFORGE_HUB_READ_TIMEOUT", float),
            ("retries", "REFORGE_HUB_RETRIES", int),
            ("backoff", "REFORGE_HUB_BACKOFF", float),
            ("deadline", "REFORGE_HUB_DEADLINE", float),
        ):
            text = os.environ.get(name)
            if text is None:
                continue
            try:
                value = kind(text)
                if not value >= 0 or value == float("inf"):
                    raise ValueError
            except ValueError as e:
                raise InvalidOptionError(f"{name}={text!r} is not a finite number >= 0.", option=name) from e
            values[field] = value
        return cls(**values)

    def timeouts(self, *, upload: bool = False) -> tuple[float, float]:
        """``(connect, read)`` seconds: as set, else huggingface_hub's metadata timeout (60 s to read an upload's
        answer)."""
        from huggingface_hub import constants

        default = float(constants.HF_HUB_ETAG_TIMEOUT)
        read = self.read if self.read is not None else (UPLOAD_READ_TIMEOUT if upload else default)
        return (self.connect if self.connect is not None else default), read


@contextlib.contextmanager
def bounded(limits: HubLimits | None = None, *, upload: bool = False) -> Iterator[HubLimits]:
    """Give every request of huggingface_hub's shared client connect and read timeouts during the block
    (`HubLimits.timeouts`; ``upload``: the longer read timeout of an upload's requests).

    Many huggingface_hub calls pass ``timeout=None`` per request, which overrides a client default, so the limits
    go in through a request hook that fills each phase left unbounded (an explicit timeout of its own is kept, and
    so is one an enclosing `bounded` block set: the innermost block wins).
    """
    from huggingface_hub.utils import get_session

    limits = limits or HubLimits.from_env()
    connect, read = limits.timeouts(upload=upload)
    fallback = {"connect": connect, "read": read, "write": read, "pool": connect}

    def bound(request) -> None:
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            k: given.get(k) if given.get(k) is not None else v for k, v in fallback.items()
        }

    hooks = get_session().event_hooks["request"]
    hooks.insert(0, bound)
    try:
        yield limits
    finally:
        if bound in hooks:
            hooks.remove(bound)


def is_retryable(error: BaseException) -> bool:
    """A timeout, a dropped connection, or an HTTP 429/5xx: worth trying again."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)):
        return True
    if isinstance(error, HfHubHTTPError):
        return getattr(getattr(error, "response", None), "status_code", None) in RETRYABLE_STATUS
    return False


def is_timeout(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a timeout, for messages."""
    import httpx2

    while error is not None:
        if isinstance(error, httpx2.TimeoutException):
            return True
        error = error.__cause__ or error.__context__
    return False


def retrying(
    call: Callable[[], T],
    limits: HubLimits | None = None,
    sleep: Callable[[float], None] = time.sleep,
    *,
    clock: Callable[[], float] = time.monotonic,
    deadline: bool = True,
    what: str = "Hub request",
) -> T:
    """``call()``, tried again after a retryable failure (`is_retryable`) up to ``limits.retries`` times.

    Before each retry a warning goes to the ``reforge.hub`` logger (what failed, the wait, which try comes). With
    ``deadline`` (metadata calls), no try starts that could not end within ``limits.deadline`` seconds of the first,
    judged by the longest try so far; uploads pass False (one may rightly take an hour). The last error is raised
    with ``tries`` and ``elapsed_s`` attributes for the message (`tries_of`).
    """
    limits = limits or HubLimits.from_env()
    start, longest = clock(), 0.0
    for attempt in range(limits.retries + 1):
        began = clock()
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - decided by type in is_retryable; others re-raise at once
            if not is_retryable(e):
                raise
            now = clock()
            longest = max(longest, now - began)
            wait = limits.backoff * 2**attempt
            late = deadline and now - start + wait + longest > limits.deadline
            if attempt == limits.retries or late:
                e.tries, e.elapsed_s = attempt + 1, now - start  # type: ignore[attr-defined]
                raise
            logging.getLogger(LOGGER).warning(
                f"{what} failed ({failure(e)}); trying again in {wait:g} s (try {attempt + 2} of at most "
                f"{limits.retries + 1}" + (f", {limits.deadline:g} s in all)." if deadline else ").")
            )
            sleep(wait)
    raise AssertionError("unreachable")


def tries_of(error: BaseException) -> tuple[int, float] | None:
    """``(tries, seconds)`` that `retrying` spent before giving up with ``error``, or None."""
    tries = getattr(error, "tries", None)
    return (tries, getattr(error, "elapsed_s", 0.0)) if isinstance(tries, int) else None


def failure(error: BaseException) -> str:
    """How a request failed, in a few words: no answer in time, a status, or the error's type."""
    if is_timeout(error):
        return "no answer in time"
    status = getattr(getattr(error, "response", None), "status_code", None)
    return f"HTTP {status}" if status else type(error).__name__
