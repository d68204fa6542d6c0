"""Secured registries, against real servers configured that way (tests.harness.secure):
etcd over TLS with client certificates, etcd with users/roles, ZooKeeper digest auth + ACLs,
ZooKeeper over TLS. Certificates are made by the harness with openssl; nothing is mocked.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

from discovery.client import Client
from discovery.errors import ConfigError, RegistryError, RegistryUnavailable
from discovery.model import Instance
from discovery.registry import Change, Registry, RegistryURL, open_registry
from tests.harness.raw_clients import expire_zk_session
from tests.harness.servers import HOST, ServerCluster, free_port, unique_prefix, wait_until

if TYPE_CHECKING:
    from tests.harness.secure import AuthEtcd, Pki, TlsEtcd, TlsZk

pytestmark = pytest.mark.integration

TTL = 2.0
TIMEOUT = 2.0  # registry timeout: how long a failing call may take before it gives up
SLACK = 3.0  # a loaded machine

OpenReg = Callable[..., Registry]


def inst(n: int = 1, service: str = "web") -> Instance:
    return Instance(service=service, id=f"node-1:{n:012x}:80", node="node-1",
                    address="127.0.0.1", port=8000 + n, registered_at=1.0)


@pytest.fixture
def open_reg() -> Iterator[OpenReg]:
    """Opens registries (ttl 2s, timeout 2s); closes what the test left open."""
    made: list[Registry] = []

    def make(url: str | RegistryURL, **kw: object) -> Registry:
        kw = {"ttl": TTL, "timeout": TIMEOUT, "environ": {}, **kw}
        reg = open_registry(url, **kw)  # type: ignore[arg-type]
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close(revoke=False)


class Follower:
    """A watch callback that keeps the state it implies."""

    def __init__(self, reg: Registry) -> None:
        self.lock = threading.Lock()
        snap = reg.snapshot()
        self.state = dict(snap.instances)
        reg.watch(self, snap.revision)

    def __call__(self, change: Change) -> None:
        with self.lock:
            if change.kind == "reset" and change.snapshot is not None:
                self.state = dict(change.snapshot.instances)
            elif change.kind == "put" and change.instance is not None:
                self.state[change.key] = change.instance
            else:
                self.state.pop(change.key, None)

    def wait_keys(self, *keys: tuple[str, str], timeout: float = 10) -> None:
        def same() -> bool:
            with self.lock:
                return set(self.state) == set(keys)
        wait_until(same, timeout, f"watch state == {sorted(keys)}")


def fails_fast(fn: Callable[[], object], exc: type[Exception], limit: float) -> str:
    """Run ``fn``, expecting ``exc`` within ``limit`` seconds; its message."""
    start = time.monotonic()
    with pytest.raises(exc) as err:
        fn()
    assert time.monotonic() - start < limit, f"took {time.monotonic() - start:.1f}s"
    return str(err.value)


# -- etcd over TLS, client certificates required --------------------------------------------


def test_etcd_tls_register_snapshot_watch(etcd_tls: TlsEtcd, open_reg: OpenReg) -> None:
    url = etcd_tls.url(unique_prefix())
    agent, reader = open_reg(url), open_reg(url)
    assert RegistryURL.parse(url).tls
    follower = Follower(reader)
    agent.register(inst(1))
    agent.register(inst(2))
    assert set(reader.snapshot().instances) == {inst(1).key, inst(2).key}
    follower.wait_keys(inst(1).key, inst(2).key)
    agent.deregister("web", inst(1).id)
    follower.wait_keys(inst(2).key)
    agent.close(revoke=True)
    follower.wait_keys()


def test_etcd_tls_from_the_environment(etcd_tls: TlsEtcd, pki: Pki, open_reg: OpenReg,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No query in the URL: the files come from DISCOVERY_REGISTRY_* (as for any command)."""
    prefix = unique_prefix()
    bare = f"etcds://{HOST}:{etcd_tls.client_ports[0]}{prefix}"
    env = {"DISCOVERY_REGISTRY_CA": str(pki.ca), "DISCOVERY_REGISTRY_CERT": str(pki.client_cert),
           "DISCOVERY_REGISTRY_KEY": str(pki.client_key)}
    open_reg(bare, environ=env).register(inst(1))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with Client(bare, timeout=TIMEOUT) as client:  # the Python client reads os.environ
        assert [i.id for i in client.instances("web")] == [inst(1).id]


def test_etcd_tls_with_a_dead_endpoint_first(etcd_tls: TlsEtcd, pki: Pki,
                                             open_reg: OpenReg) -> None:
    prefix = unique_prefix()
    url = (f"etcd://{HOST}:{free_port()},{HOST}:{etcd_tls.client_ports[0]}{prefix}"
           f"?{pki.query()}")
    reg = open_reg(url)
    reg.register(inst(1))
    assert set(reg.snapshot().instances) == {inst(1).key}


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("ca={ca}", "client certificate"),  # no client certificate
        ("ca={ca}&cert={rogue_cert}&key={rogue_key}", "client certificate"),  # untrusted one
        ("cert={cert}&key={key}", "do not trust the server certificate"),  # system CAs only
    ],
)
def test_etcd_tls_refused_fails_fast_and_says_why(etcd_tls: TlsEtcd, pki: Pki, query: str,
                                                  complaint: str, open_reg: OpenReg) -> None:
    files = {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key,
             "rogue_cert": pki.rogue_cert, "rogue_key": pki.rogue_key}
    url = f"etcds://{HOST}:{etcd_tls.client_ports[0]}/p?{query.format(**files)}"
    reg = open_reg(url)
    message = fails_fast(reg.snapshot, RegistryUnavailable, TIMEOUT + SLACK)
    assert "TLS" in message and complaint in message, message


def test_etcd_plaintext_to_a_tls_server_says_so(etcd_tls: TlsEtcd, open_reg: OpenReg) -> None:
    reg = open_reg(f"etcd://{HOST}:{etcd_tls.client_ports[0]}/p")
    message = fails_fast(reg.snapshot, RegistryUnavailable, TIMEOUT + SLACK)
    assert "TLS" in message, message


def test_tls_file_missing_is_a_config_error(tmp_path: Path, pki: Pki) -> None:
    url = f"etcd://{HOST}:{free_port()}/p?ca={pki.ca}&cert={pki.client_cert}&key={tmp_path}/k"
    with pytest.raises(ConfigError, match=r"key= file .*/k': cannot read it: No such file"):
        open_registry(url, environ={})
    with pytest.raises(ConfigError, match="DISCOVERY_REGISTRY_CA"):
        open_registry(f"zk://{HOST}:{free_port()}/p",
                      environ={"DISCOVERY_REGISTRY_CA": str(tmp_path / "ca.pem")})
    # a key that is not the certificate's, or one with a passphrase: named at once (the
    # handshake failed after the timeout, naming ca=, cert= and key= together)
    encrypted = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.client_key), "-aes256", "-passout",
                    "pass:secret", "-out", str(encrypted)], check=True, capture_output=True)
    for key in (pki.rogue_key, encrypted):
        url = f"etcd://{HOST}:{free_port()}/p?ca={pki.ca}&cert={pki.client_cert}&key={key}"
        with pytest.raises(ConfigError, match=r"key= file .* does not go with cert="):
            open_registry(url, environ={})


# -- etcd with users, roles and authentication ----------------------------------------------


def test_etcd_auth_root_and_a_prefix_user(etcd_auth: AuthEtcd, open_reg: OpenReg,
                                          tmp_path: Path) -> None:
    etcd_auth.ensure_running()
    # root, the password in the URL (with characters that need escaping)
    root_url = etcd_auth.url_as("root", etcd_auth.ROOT_PASSWORD, unique_prefix())
    assert etcd_auth.ROOT_PASSWORD not in str(RegistryURL.parse(root_url))
    root = open_reg(root_url)
    follower = Follower(open_reg(root_url))
    root.register(inst(1))
    follower.wait_keys(inst(1).key)

    # alice, limited to /alice/: the password from a file, and from the environment
    prefix = etcd_auth.USER_PREFIX + unique_prefix()
    pw_file = tmp_path / "pw"
    pw_file.write_text(etcd_auth.USER_PASSWORD + "\n")
    alice = open_reg(f"{etcd_auth.url_as('alice', None, prefix)}?password_file={pw_file}")
    alice.register(inst(2))
    reader = open_reg(etcd_auth.url_as(None, None, prefix),
                      environ={"DISCOVERY_REGISTRY_USER": "alice",
                               "DISCOVERY_REGISTRY_PASSWORD": etcd_auth.USER_PASSWORD})
    assert set(reader.snapshot().instances) == {inst(2).key}
    Follower(reader).wait_keys(inst(2).key)
    # docs/security.md's reader role: a watch-only host follows (and checks <prefix>/alive),
    # and may not write
    bob = open_reg(etcd_auth.url_as(etcd_auth.READER, etcd_auth.USER_PASSWORD, prefix))
    watching = Follower(bob)
    alice.register(inst(4))
    watching.wait_keys(inst(2).key, inst(4).key)
    bob._read_alive()  # type: ignore[attr-defined]  # its liveness read (etcd_pulse) is allowed
    message = fails_fast(lambda: bob.register(inst(5)), RegistryError, 1.5)
    assert "permission denied" in message, message

    outside = open_reg(f"{etcd_auth.url_as('alice', None, '/elsewhere')}"
                       f"?password_file={pw_file}")
    message = fails_fast(lambda: outside.register(inst(3)), RegistryError, 1.5)
    assert "permission denied" in message and "role" in message, message


def test_etcd_auth_refusals_fail_fast_and_say_why(etcd_auth: AuthEtcd,
                                                  open_reg: OpenReg) -> None:
    etcd_auth.ensure_running()
    prefix = etcd_auth.USER_PREFIX + unique_prefix()
    wrong = open_reg(etcd_auth.url_as("alice", "not-the-password", prefix))
    message = fails_fast(wrong.snapshot, RegistryError, 1.5)
    assert "authentication as 'alice' failed" in message and "invalid" in message, message
    assert "not-the-password" not in message
    fails_fast(lambda: wrong.register(inst(1)), RegistryError, 1.5)

    anonymous = open_reg(etcd_auth.url_as(None, None, prefix))
    message = fails_fast(anonymous.snapshot, RegistryError, 1.5)
    assert "authentication enabled" in message, message

    with pytest.raises(ConfigError, match="user 'alice' has no password"):
        open_registry(etcd_auth.url_as("alice", None, prefix), environ={})


def test_etcd_auth_token_expiry_and_server_restart(etcd_auth: AuthEtcd,
                                                   open_reg: OpenReg) -> None:
    """etcd forgets tokens when idle for --auth-token-ttl and when it restarts: the registry
    authenticates again, its lease and watch carry on."""
    etcd_auth.ensure_running()
    url = etcd_auth.url_as("alice", etcd_auth.USER_PASSWORD,
                           etcd_auth.USER_PREFIX + unique_prefix())
    agent, reader = open_reg(url), open_reg(url)
    agent.register(inst(1))
    follower = Follower(reader)
    # A deliberate idle window (nothing to poll without touching the token): the reader's
    # token expires on the server meanwhile.
    time.sleep(etcd_auth.TOKEN_TTL + 1.5)
    assert set(reader.snapshot().instances) == {inst(1).key}

    etcd_auth.stop()
    etcd_auth.start()
    wait_until(lambda: agent.register(inst(2)) or True, 15, "register after the restart")
    follower.wait_keys(inst(1).key, inst(2).key, timeout=15)
    assert set(open_reg(url).snapshot().instances) == {inst(1).key, inst(2).key}


# -- ZooKeeper: digest authentication and ACLs ----------------------------------------------


@pytest.fixture
def zk_base(zk_single: ServerCluster) -> str:
    zk_single.ensure_running()
    return zk_single.url(unique_prefix())


def with_user(url: str, user: str, password: str) -> str:
    return url.replace("zk://", f"zk://{user}:{password}@", 1)


def kazoo(url: str, auth: tuple[str, str] | None = None) -> KazooClient:
    parsed = RegistryURL.parse(url)
    zk = KazooClient(hosts=",".join(f"{h}:{p}" for h, p in parsed.hosts), timeout=5,
                     auth_data={("digest", f"{auth[0]}:{auth[1]}")} if auth else None)
    zk.start(timeout=10)
    return zk


def test_zk_digest_nodes_readable_by_all_changeable_by_owner(zk_base: str,
                                                             open_reg: OpenReg) -> None:
    agent_url = with_user(zk_base, "agent", "s3cret")
    agent = open_reg(agent_url)
    agent.register(inst(1))
    reader = open_reg(zk_base)  # no credentials: reads and follows
    assert set(reader.snapshot().instances) == {inst(1).key}
    follower = Follower(reader)
    follower.wait_keys(inst(1).key)

    url = RegistryURL.parse(zk_base)
    node, service_dir = url.key("web", inst(1).id), url.service_dir("web")
    for auth in (None, ("intruder", "pw"), ("agent", "wrong")):
        zk = kazoo(zk_base, auth)
        try:
            data, _ = zk.get(node)
            assert b'"service": "web"' in data or b'"service":"web"' in data
            acl, _ = zk.get_acls(node)
            assert sorted((a.id.scheme, a.acl_list) for a in acl) == [
                ("digest", ["ALL"]), ("world", ["READ"])]
            with pytest.raises(NoAuthError):
                zk.delete(node)
            with pytest.raises(NoAuthError):
                zk.set(node, b"{}")
            with pytest.raises(NoAuthError):
                zk.set_acls(node, OPEN_ACL_UNSAFE)
            with pytest.raises(NoAuthError):
                zk.create(f"{service_dir}/fake", b"{}")
            with pytest.raises(NoAuthError):
                zk.delete(service_dir, recursive=True)
        finally:
            zk.stop()
            zk.close()

    # a registry with the wrong password is refused, clearly
    wrong = open_reg(with_user(zk_base, "agent", "wrong"))
    message = fails_fast(lambda: wrong.register(inst(1)), RegistryError, 1.5)
    assert "NoAuth" in message and "another identity" in message, message
    anonymous = open_reg(zk_base)
    message = fails_fast(lambda: anonymous.register(inst(2)), RegistryError, 1.5)
    assert "give the registry user and password" in message, message

    # another agent with the same identity shares the service dir; the owner deregisters
    other_agent = open_reg(with_user(zk_base, "agent", "s3cret"))
    other_agent.register(inst(2))
    follower.wait_keys(inst(1).key, inst(2).key)
    agent.deregister("web", inst(1).id)
    follower.wait_keys(inst(2).key)
    other_agent.close(revoke=True)
    follower.wait_keys()


def test_zk_digest_password_from_env_and_session_expiry(
        zk_base: str, open_reg: OpenReg, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(1)  # every level: kazoo logs its Auth request, password and all, at debug
    env = {"DISCOVERY_REGISTRY_USER": "agent", "DISCOVERY_REGISTRY_PASSWORD": "s3cret"}
    agent = open_reg(zk_base, environ=env)
    assert "agent:***@" in str(agent.url) and "s3cret" not in str(agent.url)
    agent.register(inst(1))
    follower = Follower(open_reg(zk_base))
    follower.wait_keys(inst(1).key)
    expire_zk_session(agent.client)  # type: ignore[attr-defined]
    # the new session creates the node again, with the same ACL
    wait_until(lambda: open_reg(zk_base).snapshot().instances, 15, "re-registration")
    zk = kazoo(zk_base)
    try:
        acl, _ = zk.get_acls(RegistryURL.parse(zk_base).key("web", inst(1).id))
        assert sorted(a.id.scheme for a in acl) == ["digest", "world"]
    finally:
        zk.stop()
        zk.close()
    follower.wait_keys(inst(1).key)
    assert "auth='agent:***'" in caplog.text and "s3cret" not in caplog.text


def test_zk_warns_about_an_open_service_dir(zk_base: str, open_reg: OpenReg,
                                            caplog: pytest.LogCaptureFixture) -> None:
    zk = kazoo(zk_base)
    try:
        zk.ensure_path(RegistryURL.parse(zk_base).service_dir("web"))  # world:anyone ALL
    finally:
        zk.stop()
        zk.close()
    with caplog.at_level(logging.WARNING, logger="discovery.registry.zk_claim"):
        open_reg(with_user(zk_base, "agent", "s3cret")).register(inst(1))
        wait_until(lambda: "lets anyone delete" in caplog.text, 5, "the open-ACL warning")
    assert "s3cret" not in caplog.text


def test_zk_reader_without_read_rights_is_told(zk_base: str, open_reg: OpenReg,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Not our default (world READ), but an operator may lock reading down too."""
    zk = kazoo(zk_base, ("admin", "pw"))
    try:
        zk.create(RegistryURL.parse(zk_base).service_dir("web"), makepath=True,
                  acl=[make_digest_acl("admin", "pw", all=True)])
    finally:
        zk.stop()
        zk.close()
    reader = open_reg(zk_base)
    message = fails_fast(reader.snapshot, RegistryError, 1.5)
    assert "give the registry user and password" in message, message
    with caplog.at_level(logging.WARNING, logger="discovery.registry.zk_watch"):
        watch = reader.watch(lambda change: None)
        wait_until(lambda: "may not read" in caplog.text, 5, "the NoAuth warning")
        watch.stop()
    assert open_reg(with_user(zk_base, "admin", "pw")).snapshot().instances == {}


# -- ZooKeeper over TLS ---------------------------------------------------------------------


def test_zk_tls_with_client_cert_and_digest(zk_tls: TlsZk, pki: Pki, open_reg: OpenReg) -> None:
    zk_tls.ensure_running()
    url = zk_tls.url(unique_prefix()).replace("zks://", "zks://agent:s3cret@", 1)
    agent, reader = open_reg(url), open_reg(zk_tls.url(RegistryURL.parse(url).prefix))
    agent.register(inst(1))
    assert set(reader.snapshot().instances) == {inst(1).key}
    Follower(reader).wait_keys(inst(1).key)

    no_cert = open_reg(f"zks://{HOST}:{zk_tls.secure_port}/p?ca={pki.ca}")
    message = fails_fast(no_cert.snapshot, RegistryUnavailable, TIMEOUT + SLACK)
    assert "TLS" in message and "client certificate" in message, message
