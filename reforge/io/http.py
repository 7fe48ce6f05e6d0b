"""Every Hub request bounded in time, and retried with backoff when a retry can help.

huggingface_hub's shared HTTP client has no timeout (``timeout=None``): an endpoint that accepts the connection and
never answers held `reforge inspect` for 280 s. Inside `bounded`, that client gets connect and read timeouts;
`retrying` repeats a call that timed out, lost its connection or got 429/5xx, waiting 1 s, 2 s, 4 s ... between
tries. The limits come from the environment, read at call time:

    REFORGE_HUB_CONNECT_TIMEOUT  seconds to open a connection          (default 10)
    REFORGE_HUB_READ_TIMEOUT     seconds to wait for the next bytes     (default 60)
    REFORGE_HUB_RETRIES          extra tries after a retryable failure  (default 3)
    REFORGE_HUB_BACKOFF          first wait between tries, doubling     (default 1)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from reforge.errors import InvalidOptionError

T = TypeVar("T")
RETRYABLE_STATUS = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class HubLimits:
    """How long a Hub request may take and how often it is tried."""

    connect: float = 10.0
    read: float = 60.0
    retries: int = 3
    backoff: float = 1.0

    @classmethod
    def from_env(cls) -> "HubLimits":
        """The limits set in the environment (see the module docstring), defaults for the rest."""
        values = {}
        for field, name, kind in (
            ("connect", "REFORGE_HUB_CONNECT_TIMEOUT", float),
            ("read", "REFORGE_HUB_READ_TIMEOUT", float),
            ("retries", "REFORGE_HUB_RETRIES", int),
            ("backoff", "REFORGE_HUB_BACKOFF", float),
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


@contextlib.contextmanager
def bounded(limits: HubLimits | None = None) -> Iterator[HubLimits]:
    """Give every request of huggingface_hub's shared client connect and read timeouts during the block.

    Many huggingface_hub calls pass ``timeout=None`` per request, which overrides a client default, so the limits
    go in through a request hook that fills each phase left unbounded (an explicit timeout of its own is kept).
    """
    from huggingface_hub.utils import get_session

    limits = limits or HubLimits.from_env()
    fallback = {"connect": limits.connect, "read": limits.read, "write": limits.read, "pool": limits.connect}

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


def retrying(call: Callable[[], T], limits: HubLimits | None = None, sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, tried again after a retryable failure (`is_retryable`) up to ``limits.retries`` times."""
    limits = limits or HubLimits.from_env()
    for attempt in range(limits.retries + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - decided by type in is_retryable; others re-raise at once
            if attempt == limits.retries or not is_retryable(e):
                raise
            sleep(limits.backoff * 2**attempt)
    raise AssertionError("unreachable")
