"""Hub defaults (issue 26): metadata calls get huggingface_hub's own timeouts, every retry is said (even with
--quiet), and a silent endpoint fails within 60 s. Timing is checked with an injected clock and sleep; the one test
against a real endpoint on 127.0.0.1 runs with sub-second limits."""

from __future__ import annotations

import logging
import socket
import time

import httpx2
import pytest
from click.testing import CliRunner

from reforge.cli import cli
from reforge.io.http import UPLOAD_READ_TIMEOUT, HubLimits, bounded, retrying, tries_of


class FakeTime:
    """A clock that moves only when a try "takes" time or the code sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def _silent_call(fake: FakeTime, seconds: float):
    """A metadata call to an endpoint that never answers: each try ends in a read timeout after ``seconds``."""
    tries = []

    def call():
        tries.append(fake.now)
        fake.now += seconds
        raise httpx2.ReadTimeout("timed out")

    return call, tries


def test_metadata_calls_get_huggingface_hubs_own_timeouts(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    for name in ("REFORGE_HUB_CONNECT_TIMEOUT", "REFORGE_HUB_READ_TIMEOUT", "REFORGE_HUB_DEADLINE"):
        monkeypatch.delenv(name, raising=False)
    assert constants.HF_HUB_ETAG_TIMEOUT == 10  # what huggingface_hub allows a HEAD or an API call
    assert HubLimits.from_env().timeouts() == (10.0, 10.0)
    assert HubLimits.from_env().timeouts(upload=True) == (10.0, UPLOAD_READ_TIMEOUT)
    seen = {}
    for upload in (False, True):
        with bounded(upload=upload):
            request = httpx2.Request("GET", "http://127.0.0.1:9/api/models/a/b")
            get_session().event_hooks["request"][0](request)
            seen[upload] = request.extensions["timeout"]
    assert seen[False] == {"connect": 10.0, "read": 10.0, "write": 10.0, "pool": 10.0}
    assert seen[True]["read"] == 60.0 and seen[True]["connect"] == 10.0
    with bounded(upload=True), bounded():  # the inner block (push's metadata calls) wins
        request = httpx2.Request("GET", "http://127.0.0.1:9/api/repos/create")
        for hook in get_session().event_hooks["request"][:2]:
            hook(request)
        assert request.extensions["timeout"]["read"] == 10.0


def test_a_silent_endpoint_fails_within_60_s_by_default_saying_each_retry(caplog):
    fake = FakeTime()
    call, tries = _silent_call(fake, HubLimits().timeouts()[1])
    with caplog.at_level(logging.WARNING, logger="reforge.hub"), pytest.raises(httpx2.ReadTimeout) as caught:
        retrying(call, HubLimits(), sleep=fake.sleep, clock=fake.clock, what="Reading the file list of a/b")
    assert tries == [0, 11, 23, 37] and fake.waits == [1, 2, 4] and fake.now == 47 <= 60  # was 4 x 60 s + 7 s
    assert tries_of(caught.value) == (4, 47)
    assert [r.getMessage() for r in caplog.records] == [
        f"Reading the file list of a/b failed (no answer in time); trying again in {wait} s (try {n} of at most 4, "
        "60 s in all)."
        for wait, n in ((1, 2), (2, 3), (4, 4))
    ]


def test_no_try_starts_that_could_not_end_by_the_deadline():
    fake = FakeTime()
    call, tries = _silent_call(fake, 10)
    with pytest.raises(httpx2.ReadTimeout) as caught:
        retrying(call, HubLimits(deadline=40), sleep=fake.sleep, clock=fake.clock)
    assert tries == [0, 11, 23] and fake.now == 33  # a 4th try (after 4 s more) would end at 47 > 40
    assert tries_of(caught.value) == (3, 33)
    slow = FakeTime()  # an upload may take long: no deadline, every retry is tried
    call, tries = _silent_call(slow, 600)
    with pytest.raises(httpx2.ReadTimeout):
        retrying(call, HubLimits(deadline=40), sleep=slow.sleep, clock=slow.clock, deadline=False)
    assert len(tries) == 4


def test_retrying_says_nothing_and_waits_not_when_the_first_try_works(caplog):
    fake = FakeTime()
    with caplog.at_level(logging.WARNING, logger="reforge.hub"):
        assert retrying(lambda: "ok", HubLimits(), sleep=fake.sleep, clock=fake.clock) == "ok"
    assert caplog.records == [] and fake.waits == []


@pytest.fixture
def silent_endpoint(monkeypatch, tmp_path):
    """An endpoint on 127.0.0.1 that accepts connections (the kernel's backlog does) and never answers."""
    from huggingface_hub import constants

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("REFORGE_HUB_READ_TIMEOUT", "0.2")
    monkeypatch.setenv("REFORGE_HUB_BACKOFF", "0.01")
    monkeypatch.delenv("REFORGE_HUB_RETRIES", raising=False)
    yield server
    server.close()


def test_each_retry_is_shown_even_with_quiet(silent_endpoint):
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["inspect", "org/model", "-q"])
    took = time.monotonic() - started
    text = " ".join(result.stderr.split())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert text.count("Warning: Reading the file list of org/model failed (no answer in time); trying again") == 3
    assert "(try 4 of at most 4, 60 s in all)" in text
    assert "did not answer within 0.2 s (4 tries in " in text and "REFORGE_HUB_DEADLINE" in text
    assert took < 10, took
