"""An etcd that refuses a watch (RBAC, authentication), against a real etcd with users and roles.

A watch stream breaks (here: its etcd restarts, by the pid the harness started) and the
etcd that comes back *refuses* the watch: the role lost read on the prefix (permission
denied), the stored password was rotated (authentication failed), or the role grants read on
the followed services only while a resume watches the whole prefix at once. Refusals are not
a lost link: the watch must not retry them at the fleet's fixed resume rate forever (each
failed login costs etcd a bcrypt), it must say why each time, it must not report the
registry down (it answers), and a refused wide resume must fall back to the per-service
watches it is an optimisation of. What the watch sends is counted by etcd itself
(``grpc_server_handled_total`` by ``grpc_method``: ``Watch`` streams, ``Authenticate``).

Measured here (``spread=0.4``, 10 s from the restarted etcd's readiness), before the fix:
26-28 watch streams and 23-25 failed logins, no refusal logged, the registry reported down
and up again every TTL (5 times), and a filtered watch that never delivered again; after it:
6-7 streams and 6 logins (each logged with its reason), never reported down once etcd
answered, and the filtered watch delivering after 1-2 streams.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from discovery.errors import RegistryDenied, RegistryError
from discovery.model import Instance
from discovery.registry import Change, Registry, etcd_watch
from tests.harness.registries import no_write_back
from tests.harness.secure import ETCDCTL, AuthEtcd
from tests.harness.servers import HOST, _started, unique_prefix, wait_until
from tests.harness.util import wait_for

pytestmark = pytest.mark.integration

SPREAD = 0.4  # the URL's resume spread: the old fixed retry was 0.2 s + up to 0.4 s
WINDOW = 10.0  # seconds measured once the restarted etcd serves
#: refused attempts in WINDOW: one at once, then the wait doubles from 0.2 s (+ up to
#: 0.4 s): 0.2, 0.4, 0.8, 1.6, 3.2 s: 6, and the stream that finds its token forgotten by the
#: restart (or the root writer's login again); before: about 25
MAX_REFUSED = 8
OpenReg = Callable[..., Registry]


class RbacEtcd(AuthEtcd):
    """:class:`AuthEtcd` whose tokens outlive a test: every ``Authenticate`` counted is a
    login the registry needed, not a token that idled out."""

    TOKEN_TTL = 300

    def as_root(self, *args: str, stdin: str | None = None) -> str:
        argv = [ETCDCTL, "--endpoints", f"{HOST}:{self.client_ports[0]}", "--dial-timeout",
                "5s", "--user", f"root:{self.ROOT_PASSWORD}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, input=stdin,
                              env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, f"etcdctl {' '.join(args)}: {proc.stderr.strip()}"
        return proc.stdout

    def user(self, password: str, *grants: str) -> str:
        """A new user whose one role may read each of ``grants`` (a key, or a prefix when it
        ends with ``/``); its name."""
        name = f"u{uuid.uuid4().hex[:8]}"
        self.as_root("role", "add", name)
        for key in grants:
            self.grant(name, key)
        self.as_root("user", "add", name, "--new-user-password", password)
        self.as_root("user", "grant-role", name, name)
        return name

    def grant(self, role: str, key: str) -> None:
        self.as_root("role", "grant-permission", role, f"--prefix={key.endswith('/')}",
                     "read", key)

    def restart(self) -> None:
        """Stop the member by its pid (SIGTERM: every stream breaks) and start it again."""
        self.stop_member(0)
        self.start_member(0)

    def url_of(self, user: str, password: str, prefix: str, spread: float = SPREAD) -> str:
        return f"{self.url_as(user, password, prefix)}?spread={spread}"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RbacEtcd]:
    """A single etcd of this module's own (restarted by its tests), auth enabled."""
    for c in _started(RbacEtcd(1, tmp_path_factory.mktemp("etcd-refusals"))):
        assert isinstance(c, RbacEtcd)
        c.ensure_running()
        yield c


class Seen:
    """A watch callback that keeps the keys put, and the registry's states told."""

    def __init__(self, reg: Registry) -> None:
        self.lock = threading.Lock()
        self.puts: set[tuple[str, str]] = set()
        self.states: list[tuple[float, bool]] = []
        reg.add_state_listener(lambda up: self.states.append((time.time(), up)))

    def __call__(self, change: Change) -> None:
        with self.lock:
            if change.kind == "put":
                self.puts.add(change.key)
            elif change.kind == "reset" and change.snapshot is not None:
                self.puts.update(change.snapshot.instances)

    def has(self, inst: Instance) -> bool:
        with self.lock:
            return inst.key in self.puts

    def downs_since(self, since: float) -> int:
        """How often the registry was reported down since ``since`` (wall clock)."""
        return sum(1 for t, up in list(self.states) if t >= since and not up)


def inst(n: int, service: str = "web") -> Instance:
    return Instance(service=service, id=f"node-1:{n:012x}:80", node="node-1",
                    address="127.0.0.1", port=8000 + n, registered_at=1.0)


def refusals(caplog: pytest.LogCaptureFixture, since: float, mark: str) -> list[float]:
    """When the watch logged a refusal saying ``mark`` (wall clock, like ``since``)."""
    return [r.created for r in caplog.records
            if r.name == etcd_watch.__name__ and r.levelno == logging.WARNING
            and r.created >= since and mark in r.getMessage()]


def measure(etcd: RbacEtcd, method: str) -> tuple[float, float]:
    """WINDOW seconds from now: how many ``method`` etcd handled, and when it began."""
    before, wall = etcd.grpc_counts().get(method, 0.0), time.time()
    time.sleep(WINDOW)  # the measurement: what the host sends in WINDOW s
    # a stream the client ended just now is counted once etcd has ended it: two reads agree
    seen: list[float] = []

    def settled() -> bool:
        seen.append(etcd.grpc_counts().get(method, 0.0))
        return len(seen) > 1 and seen[-1] == seen[-2]

    wait_for(settled, 5, interval=0.15, message=f"etcd's count of {method} settled")
    return seen[-1] - before, wall


def watching(etcd: RbacEtcd, open_reg: OpenReg, password: str,
             ttl: float) -> tuple[str, str, Seen]:
    """A user allowed its own prefix, whose registry (``ttl``) watches it and has seen root's
    first put there: (the prefix, the user, what its watch saw)."""
    prefix = unique_prefix()
    name = etcd.user(password, prefix + "/")
    root = open_reg(etcd.url_as("root", etcd.ROOT_PASSWORD, prefix), ttl=10.0, timeout=2.0)
    no_write_back(root)  # a writer: no own-key stream
    reg = open_reg(etcd.url_of(name, password, prefix), ttl=ttl, timeout=2.0)
    seen = Seen(reg)
    reg.watch(seen, reg.snapshot().revision)
    root.register(inst(1))
    wait_until(lambda: seen.has(inst(1)), 10, "the first put")
    return prefix, name, seen


def test_a_watch_denied_after_a_restart_waits_longer_each_time(
        etcd: RbacEtcd, open_reg: OpenReg, caplog: pytest.LogCaptureFixture) -> None:
    """The role lost read on the prefix, then the stream broke: each refused watch comes
    later than the one before (not one every 0.2-0.6 s forever), each is logged with etcd's
    reason, and the registry, which answers the liveness read, is never reported down for it
    (it was reported down and up again every TTL)."""
    caplog.set_level(logging.WARNING, logger=etcd_watch.__name__)
    prefix, name, seen = watching(etcd, open_reg, "pw", 2.0)
    etcd.as_root("role", "revoke-permission", name, prefix + "/", "--prefix=true")
    etcd.grant(name, prefix + "/alive")  # its liveness read still answers
    etcd.restart()
    streams, wall = measure(etcd, "Watch")
    logged = refusals(caplog, wall, "permission denied")
    # the watch's tries while the restarted member's channel reconnects are a lost link;
    # from its first answer (a refusal; before the fix: etcd's first answer) it is not down
    answered = [t for t, up in list(seen.states) if up and t >= wall]
    since = logged[0] if logged else answered[0] if answered else wall
    print(f"refused watch streams in {WINDOW:g} s: {streams:g}; logged: {len(logged)}; "
          f"reported down since etcd answered: {seen.downs_since(since)}")
    assert 2 <= streams <= MAX_REFUSED, streams
    assert len(logged) >= streams - 1, (streams, len(logged))  # each said why
    gaps = [b - a for a, b in itertools.pairwise(logged)]
    assert gaps and gaps[-1] >= 1.5, gaps  # the waits double: the fourth is 1.6 s at least
    assert seen.downs_since(since) == 0, seen.states
    assert seen.states[-1][1], seen.states  # the liveness read answers: up


def test_a_rotated_password_is_not_tried_at_the_resume_rate(
        etcd: RbacEtcd, open_reg: OpenReg, caplog: pytest.LogCaptureFixture) -> None:
    """The password was changed in etcd, the host still has the old one, then the stream
    broke: each failed login (a bcrypt in etcd) comes later than the one before."""
    caplog.set_level(logging.WARNING, logger=etcd_watch.__name__)
    # a TTL of 30 s: its liveness read (which logs in too) falls after the test
    _, name, _ = watching(etcd, open_reg, "old-pw", 30.0)
    etcd.as_root("user", "passwd", name, "--interactive=false", stdin="new-pw\n")
    etcd.restart()
    logins, wall = measure(etcd, "Authenticate")
    logged = refusals(caplog, wall, f"authentication as {name!r} failed")
    print(f"failed logins in {WINDOW:g} s: {logins:g}; logged: {len(logged)}")
    assert 2 <= logins <= MAX_REFUSED, logins
    assert len(logged) >= logins - 1, (logins, len(logged))


def test_a_rotated_password_costs_no_lease(etcd: RbacEtcd, open_reg: OpenReg) -> None:
    """The host's password was changed in etcd before its configuration: etcd refuses its
    token (the auth store changed) and every login from then on. etcd renews a lease without
    a token, so its instances stay for as long as it runs; before, each renewal waited for a
    login first, and every instance of the fleet went within one TTL of the change."""
    prefix, name, ttl = unique_prefix(), f"u{uuid.uuid4().hex[:8]}", 3.0
    etcd.as_root("role", "add", name)
    etcd.as_root("role", "grant-permission", name, "--prefix=true", "readwrite", prefix + "/")
    etcd.as_root("user", "add", name, "--new-user-password", "old-pw")
    etcd.as_root("user", "grant-role", name, name)
    root = open_reg(etcd.url_as("root", etcd.ROOT_PASSWORD, prefix), ttl=10.0, timeout=2.0)
    no_write_back(root)
    reg = open_reg(etcd.url_of(name, "old-pw", prefix), ttl=ttl, timeout=2.0)
    reg.register(inst(1))
    etcd.as_root("user", "passwd", name, "--interactive=false", stdin="new-pw\n")
    with pytest.raises(RegistryError, match="authentication"):
        reg.snapshot()  # its token refused, its login too
    watched = 0
    until = time.monotonic() + 3 * ttl  # three TTLs: it would have gone after one
    while time.monotonic() < until:
        assert inst(1).key in root.snapshot().instances, f"gone after {watched} looks"
        watched += 1
        time.sleep(0.25)  # (the cadence of the looks over the window, not a wait for a state)
    assert watched >= 3 * ttl / 0.5


def test_a_refused_wide_resume_falls_back_to_the_services_watches(
        etcd: RbacEtcd, open_reg: OpenReg, caplog: pytest.LogCaptureFixture) -> None:
    """A watch of two services by a user who may read those two (and the liveness key) only:
    after a restart its resume on the whole prefix is refused; it resumes with one watcher a
    service, and a new instance reaches it (it never did: the wide watch was retried
    forever). At the next restart it does not try the wide resume again."""
    caplog.set_level(logging.WARNING, logger=etcd_watch.__name__)
    prefix = unique_prefix()
    name = etcd.user("pw", f"{prefix}/services/web/", f"{prefix}/services/api/",
                     f"{prefix}/alive")
    root = open_reg(etcd.url_as("root", etcd.ROOT_PASSWORD, prefix), ttl=10.0, timeout=2.0)
    no_write_back(root)  # a writer: no own-key stream
    reg = open_reg(etcd.url_of(name, "pw", prefix), ttl=2.0, timeout=2.0)
    seen = Seen(reg)
    snap = reg.snapshot(["web", "api"])
    watch = reg.watch(seen, snap.revision, services=["web", "api"])
    assert isinstance(watch, etcd_watch.EtcdWatch)
    root.register(inst(1))
    wait_until(lambda: seen.has(inst(1)), 10, "the first put")

    for n in (2, 3):
        wall = time.time()
        etcd.restart()
        root.register(inst(n))
        root.register(inst(n, "api"))
        wait_until(lambda n=n: seen.has(inst(n)) and seen.has(inst(n, "api")), 10,
                   f"the puts after restart {n - 1}")
        assert not watch.wide
        streams = etcd.grpc_counts().get("Watch", 0.0)  # ended since the restart
        wide = refusals(caplog, wall, "a resume watching all of")
        print(f"restart {n - 1}: watch streams {streams:g}, wide refusals logged {len(wide)}")
        assert streams <= 2, streams
        assert len(wide) == (1 if n == 2 else 0), [r.getMessage() for r in caplog.records]


def test_one_denied_service_leaves_the_others_followed(
        etcd: RbacEtcd, open_reg: OpenReg, caplog: pytest.LogCaptureFixture) -> None:
    """A watcher routing two services whose role reads one of them (a service added to the
    routed ones before the role): the read and the watch follow the one it may read (before,
    the read failed, so a watcher could not start, and the whole watch stream was refused and
    retried: no change of either came through). The denied one is asked again on the same
    stream; once granted, what it holds arrives (a reset) and then its changes."""
    caplog.set_level(logging.WARNING, logger=etcd_watch.__name__)
    prefix = unique_prefix()
    name = etcd.user("pw", f"{prefix}/services/web/", f"{prefix}/alive")
    root = open_reg(etcd.url_as("root", etcd.ROOT_PASSWORD, prefix), ttl=10.0, timeout=2.0)
    no_write_back(root)  # a writer: no own-key stream
    root.register(inst(1))
    root.register(inst(1, "api"))
    reg = open_reg(etcd.url_of(name, "pw", prefix), ttl=2.0, timeout=2.0)
    with pytest.raises(RegistryDenied, match="permission denied"):
        reg.snapshot(["api"])  # the one service: the credentials, said as such
    snap = reg.snapshot(["web", "api"])
    assert set(snap.instances) == {inst(1).key}, snap.instances
    assert snap.withheld == {"api"}  # a reader keeps what it had of api
    seen = Seen(reg)
    wall = time.time()
    reg.watch(seen, snap.revision, services=["web", "api"])
    root.register(inst(2))
    wait_until(lambda: seen.has(inst(2)), 5, "a change of the service it may read")
    wait_until(lambda: refusals(caplog, wall, "denied watching"), 5, "the denial logged")
    streams = etcd.grpc_counts().get("Watch", 0.0)

    etcd.grant(name, f"{prefix}/services/api/")
    wait_until(lambda: seen.has(inst(1, "api")), 10, "the granted service's instance")
    root.register(inst(2, "api"))
    root.register(inst(3))
    wait_until(lambda: seen.has(inst(2, "api")) and seen.has(inst(3)), 5, "both followed")
    logged = refusals(caplog, wall, "denied watching")
    print(f"denials logged: {len(logged)}; watch streams ended meanwhile: "
          f"{etcd.grpc_counts().get('Watch', 0.0) - streams:g}")
    assert etcd.grpc_counts().get("Watch", 0.0) - streams <= 1  # the reset's one new stream
    assert seen.downs_since(wall) == 0, seen.states
