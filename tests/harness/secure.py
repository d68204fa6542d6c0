"""Secured registries for tests: a throw-away PKI made with ``openssl``, etcd over TLS with
client certificates, etcd with users, roles and auth enabled (``etcdctl``), ZooKeeper over TLS.

Everything runs on loopback from the Debian packages, like tests.harness.servers (whose classes
these extend); certificates live in a tmp dir and expire in two days.

Fixtures (session): ``pki``, ``etcd_tls``, ``etcd_auth``, ``zk_tls``. Not in the global
plugin list: a test module imports the ones it uses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.harness.servers import HOST, EtcdCluster, ZkEnsemble, _started
from tests.harness.util import server_ports

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, client certificates.

    ``rogue_*``: a client certificate from another CA, which the servers do not trust.
    """

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def query(self, client: bool = True) -> str:
        """``?ca=…&cert=…&key=…`` for a registry URL (``client``: with our client cert)."""
        q = f"ca={quote(str(self.ca))}"
        if client:
            q += f"&cert={quote(str(self.client_cert))}&key={quote(str(self.client_key))}"
        return q


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN=discovery test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def _leaf(d: Path, name: str, cn: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-new", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def make_pki(d: Path) -> Pki:
    """Make every certificate with openssl in ``d`` (EC P-256 keys, PKCS#8 PEM)."""
    d.mkdir(parents=True, exist_ok=True)
    ca, rogue_ca = _ca(d, "ca"), _ca(d, "rogue-ca")
    server = _leaf(d, "server", HOST, ca,
                   f"subjectAltName=IP:{HOST},DNS:localhost\n"
                   "keyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    client_ext = "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    client = _leaf(d, "client", "discovery-agent", ca, client_ext)
    rogue = _leaf(d, "rogue", "discovery-agent", rogue_ca, client_ext)
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Pki(dir=d, ca=ca[0], server_cert=server[0], server_key=server[1],
               client_cert=client[0], client_key=client[1],
               rogue_cert=rogue[0], rogue_key=rogue[1])


# -- etcd over TLS, client certificates required ------------------------------------------


class TlsEtcd(EtcdCluster):
    """etcd serving clients on https only, with ``--client-cert-auth`` (our CA)."""

    def __init__(self, size: int, base_dir: Path, pki: Pki) -> None:
        super().__init__(size, base_dir)
        self.pki = pki
        for i, proc in enumerate(self.procs):
            plain = f"http://{HOST}:{self.client_ports[i]}"
            proc.argv = [f"https://{HOST}:{self.client_ports[i]}" if a == plain else a
                         for a in proc.argv]
            proc.argv += ["--cert-file", str(pki.server_cert), "--key-file", str(pki.server_key),
                          "--client-cert-auth", "--trusted-ca-file", str(pki.ca)]

    def url(self, prefix: str = "/discovery") -> str:
        return f"{super().url(prefix)}?{self.pki.query()}"

    def member_ready(self, i: int) -> bool:
        import pyetcd

        try:
            client = pyetcd.client(HOST, self.client_ports[i], timeout=1, ca_cert=str(self.pki.ca),
                                   cert_cert=str(self.pki.client_cert),
                                   cert_key=str(self.pki.client_key))
        except Exception:
            return False
        try:
            client.get("/health")
            return True
        except Exception:
            return False
        finally:
            client.close()


# -- etcd with authentication -------------------------------------------------------------


class AuthEtcd(EtcdCluster):
    """etcd with auth enabled: ``root`` (everything), ``alice``, whose role ``agents`` may
    read and write keys under ``/alice/`` only, and ``bob``, who may only read them. Tokens
    expire after ``TOKEN_TTL`` idle seconds, so clients must authenticate again."""

    ROOT_PASSWORD = "root pw:/@?"  # characters that need escaping in a URL
    USER, USER_PASSWORD, USER_PREFIX = "alice", "alice-secret", "/alice"
    READER = "bob"  # role ``readers``: read only, under /alice/
    TOKEN_TTL = 2

    def __init__(self, size: int, base_dir: Path) -> None:
        super().__init__(size, base_dir)
        for proc in self.procs:
            proc.argv += ["--auth-token", "simple", "--auth-token-ttl", str(self.TOKEN_TTL),
                          "--bcrypt-cost", "4"]
        self.auth_enabled = False

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        argv = [ETCDCTL, "--endpoints", ",".join(f"{HOST}:{p}" for p in self.client_ports),
                "--dial-timeout", "5s", *args]
        if user is not None:
            argv += ["--user", user]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
        if proc.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def start(self) -> None:
        super().start()
        if not self.auth_enabled:
            self.etcdctl("user", "add", "root", "--new-user-password", self.ROOT_PASSWORD)
            self.etcdctl("user", "grant-role", "root", "root")
            self.etcdctl("role", "add", "agents")
            self.etcdctl("role", "grant-permission", "agents", "--prefix=true", "readwrite",
                         self.USER_PREFIX + "/")
            self.etcdctl("user", "add", self.USER, "--new-user-password", self.USER_PASSWORD)
            self.etcdctl("user", "grant-role", self.USER, "agents")
            # docs/security.md's role for hosts that only watch: read on the whole prefix
            self.etcdctl("role", "add", "readers")
            self.etcdctl("role", "grant-permission", "readers", "--prefix=true", "read",
                         self.USER_PREFIX + "/")
            self.etcdctl("user", "add", self.READER, "--new-user-password", self.USER_PASSWORD)
            self.etcdctl("user", "grant-role", self.READER, "readers")
            self.etcdctl("auth", "enable")
            self.auth_enabled = True

    def url_as(self, user: str | None, password: str | None, prefix: str) -> str:
        """A registry URL with ``user:password@`` (escaped) or none."""
        auth = ""
        if user is not None:
            auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "") + "@"
        return super().url(prefix).replace("://", f"://{auth}", 1)

    def member_ready(self, i: int) -> bool:
        # Not pyetcd.client(user=, password=): it sends the token as call credentials, which
        # gRPC refuses on a plaintext channel. The token goes as plain metadata instead.
        import pyetcd
        from pyetcd import etcdrpc

        client = pyetcd.client(HOST, self.client_ports[i], timeout=1)
        try:
            if self.auth_enabled:
                request = etcdrpc.AuthenticateRequest(name="root", password=self.ROOT_PASSWORD)
                token = etcdrpc.AuthStub(client.channel).Authenticate(request, 1).token
                client.metadata = (("token", token),)
            client.get("/health")
            return True
        except Exception:
            return False
        finally:
            client.close()


class JwtEtcd(AuthEtcd):
    """:class:`AuthEtcd` issuing JWTs (``--auth-token jwt``, RS256, a key pair made here) that
    live ``jwt_ttl`` seconds: tokens etcd verifies by signature, so they outlive a restart."""

    def __init__(self, size: int, base_dir: Path, jwt_ttl: float = 30.0) -> None:
        super().__init__(size, base_dir)
        _openssl("genrsa", "-out", "jwt.key", "2048", cwd=base_dir)
        _openssl("rsa", "-in", "jwt.key", "-pubout", "-out", "jwt.pub", cwd=base_dir)
        token = (f"jwt,pub-key={base_dir / 'jwt.pub'},priv-key={base_dir / 'jwt.key'},"
                 f"sign-method=RS256,ttl={jwt_ttl:g}s")
        for proc in self.procs:
            at = proc.argv.index("--auth-token")
            del proc.argv[at:at + 4]  # simple, and its --auth-token-ttl
            proc.argv += ["--auth-token", token]

    def member_ready(self, i: int) -> bool:
        """``/health`` (it has a leader), asked without a login: etcd counts only the hosts'."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.client_ports[i]}/health",
                                        timeout=1) as r:
                return bool(json.load(r).get("health") == "true")
        except (OSError, ValueError):
            return False


# -- ZooKeeper over TLS ---------------------------------------------------------------------


class TlsZk(ZkEnsemble):
    """Standalone ZooKeeper with a TLS client port (Netty, PEM key store, client certificates
    required) next to its plain one (kept for the readiness probe)."""

    def __init__(self, base_dir: Path, pki: Pki) -> None:
        super().__init__(1, base_dir)
        self.pki = pki
        # outside the ephemeral range, as the members' own ports: a member restarted (the
        # rewind test) must find its port free, not taken by an outgoing connection
        self.secure_port = next(p for p in server_ports(2, HOST) if p not in self.client_ports)
        d = base_dir / "zk1"
        keystore = d / "server-keystore.pem"  # ZooKeeper's PEM key store: key and certificate
        keystore.write_bytes(pki.server_key.read_bytes() + pki.server_cert.read_bytes())
        keystore.chmod(0o600)
        with open(d / "zoo.cfg", "a") as cfg:
            cfg.write("\n".join([
                f"secureClientPort={self.secure_port}",
                f"secureClientPortAddress={HOST}",
                "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
                f"ssl.keyStore.location={keystore}", "ssl.keyStore.type=PEM",
                f"ssl.trustStore.location={pki.ca}", "ssl.trustStore.type=PEM",
                "ssl.clientAuth=need", "ssl.hostnameVerification=false",
                "authProvider.x509=org.apache.zookeeper.server.auth.X509AuthenticationProvider",
            ]) + "\n")

    def url(self, prefix: str = "/discovery") -> str:
        return f"zks://{HOST}:{self.secure_port}{prefix}?{self.pki.query()}"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsEtcd]:
    cluster = TlsEtcd(1, tmp_path_factory.mktemp("etcd-tls"), pki)
    for c in _started(cluster):
        assert isinstance(c, TlsEtcd)
        yield c


@pytest.fixture(scope="session")
def etcd_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthEtcd]:
    cluster = AuthEtcd(1, tmp_path_factory.mktemp("etcd-auth"))
    for c in _started(cluster):
        assert isinstance(c, AuthEtcd)
        yield c


@pytest.fixture(scope="session")
def zk_tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsZk]:
    cluster = TlsZk(tmp_path_factory.mktemp("zk-tls"), pki)
    for c in _started(cluster):
        assert isinstance(c, TlsZk)
        yield c
