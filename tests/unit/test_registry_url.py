"""RegistryURL parsing (credentials, TLS, masking, env), the secrets it names, the CLI registry
options."""

from __future__ import annotations

import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from kazoo.security import OPEN_ACL_UNSAFE

from discovery.cli.options import registry_options, registry_url_from
from discovery.errors import ConfigError
from discovery.registry.security import Secrets, load_secrets, zk_acl, zk_open_acl
from discovery.registry.url import DEFAULT_PREFIX, RegistryURL, mask_url
from discovery.retry import RESUME_SPREAD


@pytest.mark.parametrize(
    ("url", "scheme", "hosts", "prefix"),
    [
        ("etcd://h1", "etcd", (("h1", 2379),), DEFAULT_PREFIX),
        ("zk://h1", "zk", (("h1", 2181),), DEFAULT_PREFIX),
        ("ETCD://h1:1234", "etcd", (("h1", 1234),), DEFAULT_PREFIX),
        ("etcd://h1:2379/", "etcd", (("h1", 2379),), DEFAULT_PREFIX),
        ("etcd://h1//", "etcd", (("h1", 2379),), DEFAULT_PREFIX),
        ("etcd://a:1,b:2,c/x", "etcd", (("a", 1), ("b", 2), ("c", 2379)), "/x"),
        ("zk://192.0.2.1:2181,192.0.2.2:2182/a/b/", "zk",
         (("192.0.2.1", 2181), ("192.0.2.2", 2182)), "/a/b"),
        ("zk://[::1]:2181/p", "zk", (("::1", 2181),), "/p"),
        ("zk://[::1]/p", "zk", (("::1", 2181),), "/p"),
        ("etcd://[fe80::1]:1,h:2/p", "etcd", (("fe80::1", 1), ("h", 2)), "/p"),
        ("etcd://h:65535/t-1_a.b", "etcd", (("h", 65535),), "/t-1_a.b"),
        ("etcd://h:2379/svc@prod", "etcd", (("h", 2379),), "/svc@prod"),  # an @ of its own
        ("zk://h:2181/team@x/disc", "zk", (("h", 2181),), "/team@x/disc"),
    ],
)
def test_parse_good(url: str, scheme: str, hosts: tuple[tuple[str, int], ...],
                    prefix: str) -> None:
    parsed = RegistryURL.parse(url)
    assert (parsed.scheme, parsed.hosts, parsed.prefix) == (scheme, hosts, prefix)
    assert RegistryURL.parse(str(parsed)) == parsed  # str() is a URL that parses back


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("", "empty"),
        ("http://h:2379", "scheme"),
        ("h:2379", "scheme"),
        ("etcd://", "empty host"),
        ("etcd://h,,k", "empty host"),
        ("etcd://h,", "empty host"),
        ("etcd://h:0", "bad host:port"),
        ("etcd://h:65536", "bad host:port"),
        ("etcd://h:x", "bad host:port"),
        ("etcd://h:-1", "bad host:port"),
        ("zk://:2181", "bad host:port"),
        ("etcd://h/a b", "bad prefix"),
        ("etcd://h/a//b", "bad prefix"),
        ("etcd://h/p?spread=x", "spread= must be seconds"),
        ("zk://h/p?spread=-1", "spread= must be seconds"),
        ("zk://h/p?spread=61", "spread= must be seconds"),
        ("etcd://h/p#x", "a #"),
        ("etcd://h/p:1@q:2/x", "hosts in the prefix"),
        ("etcd://127.0.0.1:\u00b2", "bad host:port"),  # a digit, but not an ASCII one
        ("etcd://127.0.0.1:\u0661\u0662\u0663", "bad host:port"),  # (was read as port 123)
        ("etcd://h:" + "9" * 5000, "bad host:port"),  # (int() of it raised)
        ("zk://zk1..example.com:1/p", "bad host:port"),  # (killed kazoo's connection thread)
        ("zk://h\u00e9.example.com/p", "bad host:port"),
        ("etcd://::1", "in brackets"),  # (was host ':', port 1)
        ("etcd://2001:db8::5", "in brackets"),  # (was host '2001:db8:', port 5)
    ],
)
def test_parse_bad(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as err:
        RegistryURL.parse(url)
    assert complaint in str(err.value)


def test_resume_spread_from_the_url_or_the_default() -> None:
    assert RegistryURL.parse("etcd://h/p").resume_spread == RESUME_SPREAD
    url = RegistryURL.parse("zk://h/p?spread=0.5")
    assert url.resume_spread == 0.5 and RegistryURL.parse(str(url)) == url
    assert RegistryURL.parse("etcd://h?spread=0").resume_spread == 0
    assert RegistryURL.parse("etcd://h/p?spread=7").resume_spread == 7


def test_keys() -> None:
    url = RegistryURL.parse("etcd://h/p")
    assert url.service_dir("web") == "/p/services/web"
    assert url.key("web", "n1:abc:80") == "/p/services/web/n1:abc:80"
    assert url.split_key("/p/services/web/n1:abc:80") == ("web", "n1:abc:80")
    for other in ["/p/services/web", "/p/services/web/", "/p/services//x", "/q/services/web/x",
                  "/p/services/web/x/y", "/p/servicesx/web/x", "/p/other/web/x"]:
        assert url.split_key(other) is None, other


# -- credentials and TLS in the URL (docs/security.md) ------------------------------------

SECRET = "s3cr:t/@?#%"  # every character that needs escaping in a URL
QUOTED = "s3cr%3At%2F%40%3F%23%25"


def test_userinfo_and_tls_parameters() -> None:
    url = RegistryURL.parse(f"etcd://al%40ice:{QUOTED}@h1:1,h2/p?ca=/a%20b.pem&cert=/c&key=/k")
    assert (url.user, url.password, url.hosts, url.prefix) == (
        "al@ice", SECRET, (("h1", 1), ("h2", 2379)), "/p")
    assert (url.tls, url.tls_ca, url.tls_cert, url.tls_key) == (True, "/a b.pem", "/c", "/k")
    assert RegistryURL.parse(url.to_url(reveal=True)) == url


@pytest.mark.parametrize(
    ("text", "tls", "scheme"),
    [("etcd://h", False, "etcd"), ("etcds://h", True, "etcd"), ("zks://h", True, "zk"),
     ("etcd://h?ca=/ca.pem", True, "etcd"), ("zk://h?cert=/c&key=/k", True, "zk")],
)
def test_tls_from_scheme_or_files(text: str, tls: bool, scheme: str) -> None:
    url = RegistryURL.parse(text)
    assert (url.tls, url.scheme) == (tls, scheme)
    assert str(url).startswith(scheme + ("s://" if tls else "://"))
    assert RegistryURL.parse(str(url)) == url


@pytest.mark.parametrize(
    "text",
    [f"etcd://bob:{QUOTED}@h/p", f"zk://bob:{QUOTED}@h:2181/p?ca=/x",
     f"etcds://bob:{SECRET}@h/p"],  # unescaped: urlsplit cuts it oddly, still never shown
)
def test_password_never_in_str_repr_or_errors(text: str) -> None:
    try:
        url = RegistryURL.parse(text)
    except ConfigError as exc:
        shown = [str(exc)]
    else:
        assert url.password
        shown = [str(url), repr(url), url.to_url(), f"{url}", str([url])]
        assert "bob:***@" in str(url)
    for s in shown:
        assert "s3cr" not in s, s


def test_masked_password_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"masked"):
        RegistryURL.parse(str(RegistryURL.parse("etcd://u:pw@h/p")))


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("etcd://:pw@h", "user is empty"),
        ("etcd://u:@h", "password is empty"),
        ("etcd://h?nope=1", "unknown parameter 'nope'"),
        ("etcd://h?ca=", "ca= is empty"),
        ("etcd://h?ca=/a&ca=/b", "ca= given twice"),
        ("etcd://h?cert=/c", "cert= needs key="),
        ("etcd://h?key=/k", "key= needs cert="),
        ("etcd://u:pw@h?password_file=/f", "password and password_file="),
        ("zk://a%3Ab:pw@h", "cannot contain ':'"),
        ("ftps://h", "scheme"),
        ("etcd://u:pw@[::1/p", "Invalid IPv6 URL"),
    ],
)
def test_bad_credentials_name_the_parameter(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as err:
        RegistryURL.parse(text)
    assert "pw" not in str(err.value).replace("password", "")


@pytest.mark.parametrize(
    ("text", "masked"),
    [("etcd://u:pw@h:1/p", "etcd://u:***@h:1/p"), ("u:pw@h", "u:***@h"),
     ("etcd://u@h/p", "etcd://u@h/p"), ("etcd://h/p?ca=/x", "etcd://h/p?ca=/x"),
     ("zk://u:p/w@d@h/p", "zk://u:***@h/p")],
)
def test_mask_url(text: str, masked: str) -> None:
    assert mask_url(text) == masked


ENV = {"DISCOVERY_REGISTRY_USER": "envuser", "DISCOVERY_REGISTRY_PASSWORD": "envpw",
       "DISCOVERY_REGISTRY_CA": "/env/ca", "DISCOVERY_REGISTRY_CERT": "/env/cert",
       "DISCOVERY_REGISTRY_KEY": "/env/key"}


def test_env_fills_what_the_url_leaves_out() -> None:
    url = RegistryURL.parse("etcd://h/p").with_env(ENV)
    assert (url.user, url.password, url.tls_ca, url.tls_cert, url.tls_key, url.tls) == (
        "envuser", "envpw", "/env/ca", "/env/cert", "/env/key", True)
    assert "envpw" not in str(url) and "envpw" not in repr(url)


def test_url_wins_over_env() -> None:
    url = RegistryURL.parse("etcd://u:pw@h/p?ca=/url/ca").with_env(ENV)
    assert (url.user, url.password, url.tls_ca, url.tls_cert) == ("u", "pw", "/url/ca",
                                                                   "/env/cert")
    # another user in the URL: the environment's password is not theirs
    assert RegistryURL.parse("etcd://u@h/p").with_env(ENV).password is None
    # the URL's password file beats the environment's password
    url = RegistryURL.parse("etcd://u@h/p?password_file=/f").with_env(ENV)
    assert (url.password, url.password_file) == (None, "/f")


def test_env_empty_values_are_unset_and_password_beats_password_file() -> None:
    env = {"DISCOVERY_REGISTRY_USER": "", "DISCOVERY_REGISTRY_CA": "",
           "DISCOVERY_REGISTRY_PASSWORD": "pw", "DISCOVERY_REGISTRY_PASSWORD_FILE": "/f"}
    url = RegistryURL.parse("zk://u@h/p").with_env(env)
    assert (url.user, url.password, url.password_file, url.tls) == ("u", "pw", None, False)
    assert RegistryURL.parse("zk://h/p").with_env({}) == RegistryURL.parse("zk://h/p")


def test_with_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCOVERY_REGISTRY_USER", "fromenv")
    assert RegistryURL.parse("etcd://h").with_env().user == "fromenv"


# -- reading the secrets (discovery.registry.security) -------------------------------------

PEM_CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


def self_signed(folder: Path) -> tuple[bytes, bytes]:
    """A real certificate and its key (load_secrets checks that the two go together)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=t", "-days", "1",
                    "-keyout", str(folder / "k.pem"), "-out", str(folder / "c.pem")],
                   check=True, capture_output=True, timeout=30)
    return (folder / "c.pem").read_bytes(), (folder / "k.pem").read_bytes()


def test_load_secrets_reads_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    (tmp_path / "ca.pem").write_bytes(PEM_CERT)
    cert, key = self_signed(tmp_path)
    url = RegistryURL.parse(f"etcd://u@h/p?password_file={tmp_path}/pw&ca={tmp_path}/ca.pem"
                            f"&cert={tmp_path}/c.pem&key={tmp_path}/k.pem")
    secrets = load_secrets(url)
    assert (secrets.user, secrets.password) == ("u", "from-file")
    assert (secrets.ca, secrets.cert, secrets.key) == (PEM_CERT, cert, key)
    assert "from-file" not in repr(secrets) and "PRIVATE" not in repr(secrets)
    (tmp_path / "k.pem").write_bytes(PEM_KEY)  # a key that is not the certificate's
    with pytest.raises(ConfigError, match=r"key= file .*k.pem' does not go with cert="):
        load_secrets(url)


@pytest.mark.parametrize("url", ["etcd://user:4321/Sup3rSecret@h:1/p",  # read as h:port/path
                                 "etcd://user:4321#Sup3rSecret@h/p",  # read as a fragment
                                 "etcd://user:Sup3r\uff03Secret@h:1/p"])  # urlsplit's own error
def test_a_malformed_userinfo_never_shows_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        RegistryURL.parse(url)
    assert "Secret" not in str(err.value) and "***" in str(err.value)


def test_load_secrets_names_a_path_with_a_nul() -> None:
    with pytest.raises(ConfigError, match=r"ca= is empty or has a NUL"):
        load_secrets(RegistryURL.parse("etcd://h/p?ca=%00"))


def test_kazoo_auth_lines_are_masked_whatever_the_quotes() -> None:
    import logging

    from kazoo.protocol.serialization import Auth

    from discovery.registry.security import MaskAuth

    for auth in ("o'brien:Secr3t", "user:ab'Secr3t", 'user:pa)Sec"r3t', "user:Secr3t"):
        record = logging.LogRecord("kazoo", logging.DEBUG, __file__, 1,
                                   "Sending request(xid=%s): %s", (7, Auth(0, "digest", auth)),
                                   None)
        MaskAuth().filter(record)
        assert "Secr3t" not in record.getMessage() and "r3t" not in record.getMessage()
        assert "***" in record.getMessage()


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("ca={d}/missing.pem", r"ca= file '.*missing.pem': cannot read it: No such file"),
        ("ca={d}", r"ca= file .*: cannot read it: a directory, not a regular file"),
        ("ca={d}/k.pem", r"ca= file .*: not a PEM certificate"),
        ("cert={d}/ca.pem&key={d}/ca.pem", r"key= file .*: not a PEM private key"),
    ],
)
def test_load_secrets_names_the_bad_file(tmp_path: Path, query: str, complaint: str) -> None:
    (tmp_path / "ca.pem").write_bytes(PEM_CERT)
    (tmp_path / "k.pem").write_bytes(PEM_KEY)
    with pytest.raises(ConfigError, match=complaint):
        load_secrets(RegistryURL.parse(f"etcd://h/p?{query.format(d=tmp_path)}"))


def test_load_secrets_password_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="user 'u' has no password"):
        load_secrets(RegistryURL.parse("etcd://u@h/p"))
    with pytest.raises(ConfigError, match="a password but no user"):
        load_secrets(RegistryURL.parse("etcd://h/p").with_env({"DISCOVERY_REGISTRY_PASSWORD":
                                                               "pw"}))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"password_file= .* is empty"):
        load_secrets(RegistryURL.parse(f"etcd://u@h/p?password_file={tmp_path}/empty"))
    assert load_secrets(RegistryURL.parse("etcd://h/p")) == Secrets()


def test_zk_acl_owner_all_world_read() -> None:
    acl = zk_acl(Secrets(user="agent", password="pw"))
    assert acl is not None
    assert [(a.id.scheme, a.id.id.split(":")[0], a.acl_list) for a in acl] == [
        ("digest", "agent", ["ALL"]), ("world", "anyone", ["READ"])]
    assert zk_open_acl(acl) is None
    assert zk_open_acl(OPEN_ACL_UNSAFE) == "world:anyone:ALL"
    assert zk_acl(Secrets()) is None


# -- the CLI options (discovery.cli.options) ----------------------------------------------


def test_registry_url_from_folds_flags(tmp_path: Path) -> None:
    assert registry_url_from({"registry": "etcd://h/p"}) == "etcd://h/p"
    assert registry_url_from({"registry": None}) is None
    folded = registry_url_from({"registry": "etcd://h/p", "registry_ca": "/ca",
                                "registry_user": "bob", "registry_password_file": "/pw",
                                "registry_cert": None})
    assert folded == "etcds://bob@h:2379/p?ca=/ca&password_file=/pw"
    url = RegistryURL.parse(folded or "")
    assert (url.user, url.tls_ca, url.password_file, url.password) == ("bob", "/ca", "/pw", None)
    # the same value twice is fine, a different one is not
    assert registry_url_from({"registry": "etcd://h/p?ca=/ca", "registry_ca": "/ca"})
    with pytest.raises(ConfigError, match="--registry-ca '/other' contradicts ca="):
        registry_url_from({"registry": "etcd://h/p?ca=/ca", "registry_ca": "/other"})
    with pytest.raises(ConfigError, match="--registry-user 'x' contradicts user@"):
        registry_url_from({"registry": "etcd://bob@h/p", "registry_user": "x"})
    with pytest.raises(ConfigError, match="has a password too"):
        registry_url_from({"registry": "etcd://bob:pw@h/p", "registry_password_file": "/f"})
    with pytest.raises(ConfigError, match="--registry-key given without --registry"):
        registry_url_from({"registry": None, "registry_key": "/k"})
    with pytest.raises(ConfigError, match="cert= needs key="):
        registry_url_from({"registry": "etcd://h/p", "registry_cert": "/c"})


def _toy_command() -> click.Command:
    @click.command()
    @registry_options(required=False)
    @click.option("--other", default="o")
    def toy(registry: str | None, other: str) -> None:
        click.echo(f"{registry}|{other}")

    return toy


def test_registry_options_hand_the_command_one_url(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(PEM_CERT)
    run = CliRunner().invoke
    toy = _toy_command()
    result = run(toy, ["--registry", "zk://h/p", "--registry-ca", str(ca), "--registry-user",
                       "bob", "--other", "x"], env={})
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"zks://bob@h:2181/p?ca={ca}|x"
    # from the environment: not folded (open_registry reads the same variables)
    result = run(toy, [], env={"DISCOVERY_REGISTRY": "etcd://h/p",
                               "DISCOVERY_REGISTRY_CA": str(ca)})
    assert result.output.strip() == "etcd://h/p|o"
    result = run(toy, ["--registry", "etcd://h/p", "--registry-ca", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = run(toy, ["--registry-ca", str(ca)], env={})
    assert result.exit_code == 2 and "without --registry" in result.output
    assert "--registry-password " not in run(toy, ["--help"]).output  # a file, never a value


@pytest.mark.parametrize(
    ("text", "own"),
    [("etcd://h/p", "keys"), ("etcd://h/p?own=keys", "keys"),
     ("etcd://h/p?own=Services", "services"), ("etcd://h/p?own=off", "off"),
     ("zk://h/p?own=off", "off"), ("zk://h/p?own=keys", "keys")],
)
def test_own_says_how_a_host_follows_its_own_entries(text: str, own: str) -> None:
    url = RegistryURL.parse(text)
    assert url.own_watch == own
    assert RegistryURL.parse(str(url)) == url  # (own= kept as given, lowercased)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [("zk://h/p?own=services", "own= must be one of keys, off on zk://"),
     ("etcd://h/p?own=all", "own= must be one of keys, services, off on etcd://"),
     ("etcd://h/p?own=", "own= is empty")],
)
def test_a_bad_own_is_named(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        RegistryURL.parse(text)
