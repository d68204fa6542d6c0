"""etcd_keepalive's status probe, on fake streams: a renewal not answered half-way through the
client's timeout costs the member a status call, unless the member has answered PROMPT
renewals within FAST (a member, not a proxy); a renewal it then leaves unanswered past the
timeout starts the count again."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from pyetcd import exceptions as etcd_exc

from discovery.registry import etcd_keepalive
from discovery.registry.etcd_keepalive import LATE, PROMPT, KeepAliveStream

TIMEOUT = 0.6  # the client's: a probe from 0.3 s on
SLOW = 0.45  # an answer after the probe started (and late: over LATE)
FAST_HERE = 0.1  # FAST for these tests: a loop that stalls a moment still counts as fast
NEVER = None


class Member:
    """One fake member: its keepalive streams answer after ``delay`` s (NEVER: not at all),
    and its status calls are counted (each answered at once)."""

    netloc = "127.0.0.1:2379"

    def __init__(self) -> None:
        self.delay: float | None = 0.0
        self.status_calls = 0
        self.failed = 0
        self.ends = False  # its streams end without an answer nor an error

    def fail(self) -> None:
        self.failed += 1

    def hung(self) -> None:  # etcd_aio.Endpoint.hung: fails it, tells its streams
        self.fail()

    def keepalive(self, metadata: Any = None) -> Any:
        return Stream(self)

    async def Status(self, request: Any, timeout: float, metadata: Any) -> None:
        self.status_calls += 1


class Stream:
    """A keepalive stream to ``member``: each renewal answered after the member's delay now."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self.answers: asyncio.Queue[Any] = asyncio.Queue()

    async def write(self, request: Any) -> None:
        if self.member.delay is not None:
            asyncio.get_running_loop().call_later(
                self.member.delay, self.answers.put_nowait, SimpleNamespace(ID=request.ID, TTL=10))

    async def read(self) -> Any:
        if self.member.ends:
            return grpc.aio.EOF
        return await self.answers.get()

    def cancel(self) -> None:
        pass


@pytest.fixture
def member(monkeypatch: pytest.MonkeyPatch) -> Member:
    m = Member()
    monkeypatch.setattr(etcd_keepalive, "FAST", FAST_HERE)
    monkeypatch.setattr(etcd_keepalive.etcdrpc, "LeaseStub",
                        lambda channel: SimpleNamespace(LeaseKeepAlive=m.keepalive))
    return m


def renewals(member: Member, delays: list[float | None], hint: str = "") -> list[str]:
    """Renew once per delay on one KeepAliveStream: 'ok' or the error's name, in order."""
    client = SimpleNamespace(timeout=TIMEOUT, metadata=None, channel=None,
                             endpoint_in_use=member)
    channels = SimpleNamespace(pick=lambda c: (member, None), stub=lambda kind, e: member)
    stream = KeepAliveStream(client, channels, lambda: None,  # type: ignore[arg-type]
                             late_wait=TIMEOUT + 1.0, hint=lambda: hint)

    async def run() -> list[str]:
        outcomes = []
        for delay in delays:
            member.delay = delay
            try:
                assert (await stream.renew_async(7))[0].ID == 7
                outcomes.append("ok")
            except etcd_exc.ConnectionTimeoutError as exc:
                outcomes.append(type(exc).__name__)
        return outcomes

    return asyncio.run(run())


def test_a_slow_renewal_of_a_member_not_known_yet_is_probed(member: Member) -> None:
    assert renewals(member, [0.0] * (PROMPT - 1) + [SLOW]) == ["ok"] * PROMPT
    assert member.status_calls == 1


def test_answers_slower_than_fast_do_not_count(member: Member) -> None:
    between = (FAST_HERE + LATE) / 2  # neither late nor a member's own
    assert renewals(member, [between] * PROMPT + [SLOW]) == ["ok"] * (PROMPT + 1)
    assert member.status_calls == 1


def test_a_member_that_answered_prompt_renewals_fast_is_not_probed(member: Member) -> None:
    assert renewals(member, [0.0] * PROMPT + [SLOW]) == ["ok"] * (PROMPT + 1)
    assert member.status_calls == 0


def test_a_renewal_left_unanswered_starts_the_count_again(member: Member) -> None:
    outcomes = renewals(member, [0.0] * PROMPT + [NEVER, SLOW])
    assert outcomes == ["ok"] * PROMPT + ["ConnectionTimeoutError", "ok"]
    assert member.failed == 1
    assert member.status_calls == 1  # the slow renewal after the failure only


@pytest.mark.parametrize(("delays", "told"), [
    ([SLOW] * 2, False),  # two late answers: not yet
    ([SLOW] * 4, True),  # as a proxy answers: told once
    ([0.0] + [SLOW] * 4, False),  # 4 late, 1 prompt: not far more late than prompt
    ([0.0] + [SLOW] * 5, True),
])
def test_a_member_answering_as_a_proxy_does_is_told_of_once(
        member: Member, caplog: pytest.LogCaptureFixture, delays: list[float | None],
        told: bool) -> None:
    """``hint`` (what to do behind etcd grpc-proxy) is logged once, at INFO, when a member has
    answered ``HINT_AFTER`` renewals late and more than four times as many as prompt."""
    with caplog.at_level("INFO", logger=etcd_keepalive.__name__):
        assert renewals(member, delays, hint="use own=services") == ["ok"] * len(delays)
    told_of = [r for r in caplog.records if "use own=services" in r.getMessage()]
    assert len(told_of) == told and all(r.levelname == "INFO" for r in told_of)


def test_a_stream_that_ends_without_an_answer_is_a_link_to_try_again_not_a_lost_lease(
        member: Member) -> None:
    """A keepalive stream that ends cleanly (a proxy may) is no answer: the renewal is tried
    again on another stream. It came back as no answer at all, which the keeper took for
    etcd's word that the lease was gone: a new lease, every instance written again."""
    member.ends = True
    with pytest.raises(etcd_exc.ConnectionFailedError):
        renewals(member, [0.0])
    member.ends = False
    assert renewals(member, [0.0]) == ["ok"]  # a new stream
