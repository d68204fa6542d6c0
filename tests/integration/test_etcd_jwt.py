"""etcd issuing JWTs (``--auth-token jwt``), against a real etcd: the token a host holds is
renewed ahead of its expiry (``EtcdAuth``: at a random moment of its life, so a fleet does not
log in together), and it outlives a restart of the members (a simple token does not once etcd
has taken a raft snapshot since it was issued: then every host of a fleet logs in again at
once, a bcrypt each; docs/security.md, "A fleet and its logins"). What etcd answered is counted
by etcd itself (``grpc_server_handled_total``: ``Authenticate`` calls, ``Unauthenticated``
answers: a call made with a token etcd no longer takes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from discovery.model import Instance
from discovery.registry import Registry, security
from tests.harness.secure import JwtEtcd
from tests.harness.servers import _started, unique_prefix, wait_until

pytestmark = pytest.mark.integration

JWT_TTL = 4.0  # seconds a token lives
OpenReg = Callable[..., Registry]


def started(factory: pytest.TempPathFactory, name: str, ttl: float) -> Iterator[JwtEtcd]:
    for c in _started(JwtEtcd(1, factory.mktemp(name), jwt_ttl=ttl)):
        assert isinstance(c, JwtEtcd)
        c.ensure_running()
        yield c


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtEtcd]:
    yield from started(tmp_path_factory, "etcd-jwt", JWT_TTL)


@pytest.fixture(scope="module")
def etcd_long(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtEtcd]:
    """JWTs of 10 minutes, as a fleet's: none expires or is renewed during a test."""
    yield from started(tmp_path_factory, "etcd-jwt-long", 600)


def handled(etcd: JwtEtcd, code: str = "", method: str = "") -> float:
    """etcd's count of the calls it answered with gRPC ``code`` (any), to ``method`` (any)."""
    counts = etcd.grpc_counts(code=code)
    return counts.get(method, 0.0) if method else sum(counts.values())


def user_url(etcd: JwtEtcd) -> str:
    """The harness user's registry URL on a fresh prefix of its own."""
    return etcd.url_as(etcd.USER, etcd.USER_PASSWORD, etcd.USER_PREFIX + unique_prefix())


def test_a_jwt_is_renewed_before_etcd_would_refuse_it(
        etcd: JwtEtcd, open_reg: OpenReg, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads every 0.2 s for two and a half of the token's lives: etcd's own JWTs are read,
    each renewed within 25-45 % of its life here (the window narrowed to fit the test, 1.6 s
    of it left at least; 50-90 % by default), and etcd never answers a call with a token it
    no longer takes. Before, the host held its token until etcd refused a call with it, then
    logged in: at the same moment as every host whose token was issued with its own."""
    monkeypatch.setattr(security, "RENEW_MIN", 1.0)
    monkeypatch.setattr(security, "RENEW_WITHIN", (0.25, 0.45))
    reg = open_reg(user_url(etcd), ttl=10.0, timeout=3.0)
    reg.snapshot()  # the first login
    refused, logins = handled(etcd, code="Unauthenticated"), handled(etcd, method="Authenticate")
    ends = time.monotonic() + 2.5 * JWT_TTL
    while time.monotonic() < ends:
        reg.snapshot()
        time.sleep(0.2)
    renewed = handled(etcd, method="Authenticate") - logins
    print(f"renewals in {2.5 * JWT_TTL:g} s of a token living {JWT_TTL:g} s: {renewed:g}")
    # every 1.0-1.8 s, + a read's 0.2 s and the login (0.75 s at the soonest: a token's
    # expiry is in whole seconds); a renewal at each read would be 50
    assert 4 <= renewed <= 14, renewed
    assert handled(etcd, code="Unauthenticated") == refused


def test_a_jwt_outlives_a_restart_of_etcd(etcd_long: JwtEtcd, open_reg: OpenReg) -> None:
    """The token held before etcd restarted is taken after it: no login after the restart
    (the harness asks the member's readiness without one), no call answered Unauthenticated,
    the host's instance and watch carry on. (The host drops a token only when etcd says it no
    longer takes it: a lost link keeps it.)"""
    etcd = etcd_long
    reg = open_reg(user_url(etcd), ttl=10.0, timeout=3.0)
    web = Instance(service="web", id="n1:000000000001:80", node="n1", address="127.0.0.1",
                   port=8080, registered_at=1.0)
    reg.register(web)
    seen: list[str] = []
    reg.watch(lambda change: seen.append(change.kind), reg.snapshot().revision)
    etcd.stop_member(0)  # its only member: a full restart (SIGTERM, by the harness's pid)
    etcd.start_member(0)
    refused = handled(etcd, code="Unauthenticated")  # a new count: the member restarted
    reg.register(Instance(service="web", id="n1:000000000002:80", node="n1",
                          address="127.0.0.1", port=8081, registered_at=1.0))
    wait_until(lambda: "put" in seen, 10, "the put after the restart, watched")
    assert set(reg.snapshot().instances) == {web.key, ("web", "n1:000000000002:80")}
    assert refused == 0 and handled(etcd, code="Unauthenticated") == 0
    assert handled(etcd, method="Authenticate") == 0  # the member's count since its restart
