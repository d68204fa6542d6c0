"""Watcher settings: TOML, --service flags, --wait, durations, and the HAProxy token whitelist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from discovery.errors import ConfigError, ValidationError
from discovery.model import Instance
from discovery.model.durations import format_duration, parse_duration, to_ms
from discovery.watcher.config import (
    CHECK_KEYWORDS,
    SERVER_KEYWORDS,
    ServiceConfig,
    WatcherConfig,
    load_watcher_config,
    merge,
    parse_options,
    parse_service_arg,
    parse_wait,
    watcher_config_from_dict,
)

FULL = """
[agent]            # other sections of a shared file are ignored
registry = "etcd://127.0.0.1:2379"

[watcher]
maxconn = 2000
stats_port = 8404
wait = "100ms:2s"
reload_min_interval = "5s"
template = "/etc/discovery/haproxy.cfg.j2"
timeouts = { connect = "2s", client = 30000 }

[services.web]
port = 18000
balance = "leastconn"
server_options = "maxconn 100 slowstart 10s"
check = true
check_options = "inter 1s fall 2 rise 1"
httpchk = "/health"
tags = ["blue", "api"]
slots = 16
maxconn = 500
timeouts = { server = "1m", http_request = "5s" }

[services.db]
port = 15432
bind = "127.0.0.2"
mode = "tcp"
"""


def load(tmp_path: Path, text: str) -> WatcherConfig:
    path = tmp_path / "discovery.toml"
    path.write_text(text)
    return load_watcher_config(path)


def test_full_file(tmp_path: Path) -> None:
    cfg = load(tmp_path, FULL)
    assert cfg.maxconn == 2000 and cfg.stats_port == 8404
    assert (cfg.wait_min, cfg.wait_max, cfg.reload_min_interval) == (0.1, 2.0, 5.0)
    assert cfg.template == "/etc/discovery/haproxy.cfg.j2"
    assert dict(cfg.timeouts) == {"client": 30000, "connect": 2000, "server": 60000}
    assert list(cfg.services) == ["db", "web"]
    web = cfg.services["web"]
    assert web == ServiceConfig(
        name="web",
        port=18000,
        balance="leastconn",
        server_options=("maxconn", "100", "slowstart", "10s"),
        check=True,
        check_options=("inter", "1s", "fall", "2", "rise", "1"),
        httpchk="/health",
        tags=("api", "blue"),
        slots=16,
        maxconn=500,
        timeouts={"http-request": 5000, "server": 60000},
    )
    db = cfg.services["db"]
    assert (db.bind, db.port, db.mode, db.balance, db.check) == (
        "127.0.0.2", 15432, "tcp", "roundrobin", False,
    )  # fmt: skip


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert cfg == WatcherConfig()
    assert cfg.services == {} and cfg.stats_port is None and cfg.maxconn == 4096
    assert dict(cfg.timeouts) == {"connect": 5000, "client": 60000, "server": 60000}
    assert (cfg.wait_min, cfg.wait_max) == (0.02, 0.5)


def bad(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        load(tmp_path, text)
    assert "\n" not in str(err.value)


SVC = "[services.web]\nport = 18000\n"
LONG_SERVER = (
    "maxconn 1 minconn 1 maxqueue 1 slowstart 1s backup send-proxy tfo ssl verify none alpn h2 "
    "proto h2 ws auto ssl-min-ver TLSv1.2 no-ssl-reuse pool-max-conn 1 pool-low-conn 1 tcp-ut 1s "
    "observe layer4 error-limit 2 on-error fastinter on-marked-down shutdown-sessions "
    "max-reuse 1 pool-purge-delay 1s ssl-max-ver TLSv1.3"
)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[watcher\n", "discovery.toml"),
        ("watcher = 1\n", r"watcher: must be a table"),
        ("[watcher]\nmaxcon = 1\n", r"watcher\.maxcon: unknown key"),
        ('[watcher]\n"a\\nb" = 1\n', r"watcher\.'a\\nb': unknown key"),
        ("[watcher]\nmaxconn = 0\n", r"watcher\.maxconn"),
        ("[watcher]\nmaxconn = true\n", r"watcher\.maxconn"),
        ('[watcher]\nstats_port = "80"\n', r"watcher\.stats_port"),
        ('[watcher]\nwait = "2s:1s"\n', r"watcher\.wait"),
        ('[watcher]\nwait = "soon"\n', r"watcher\.wait"),
        ('[watcher]\nreload_min_interval = "2h"\n', r"watcher\.reload_min_interval"),
        ('[watcher.timeouts]\nconect = "1s"\n', r"watcher\.timeouts\.conect: unknown timeout"),
        ('[watcher.timeouts]\nconnect = "1 s s"\n', r"watcher\.timeouts\.connect"),
        ("[watcher.timeouts]\nconnect = 0\n", r"watcher\.timeouts\.connect"),
        ("[watcher.timeouts]\nconnect = nan\n", r"watcher\.timeouts\.connect: must be a finite"),
        ("[watcher.timeouts]\nconnect = inf\n", r"watcher\.timeouts\.connect: must be a finite"),
        ('[watcher.timeouts]\nconnect = "2d"\n', r"watcher\.timeouts\.connect"),
        ("services = 1\n", r"services: must be a table"),
        ("[services.Web]\nport = 1\n", r"services\.<name>: 'Web' is not a DNS label"),
        ('[services."a\\nb"]\nport = 1\n', r"services\.<name>"),
        ("[services.web]\nbind = \"127.0.0.1\"\n", r"services\.web\.port: missing"),
        (SVC + "prot = 1\n", r"services\.web\.prot: unknown key"),
        (SVC + "name = 'x'\n", r"services\.web\.name: unknown key"),
        ("[services.web]\nport = 70000\n", r"services\.web\.port"),
        ("[services.web]\nport = \"18000\"\n", r"services\.web\.port"),
        (SVC + "bind = 'localhost'\n", r"services\.web\.bind: 'localhost' is not an IP"),
        (SVC + "bind = 1\n", r"services\.web\.bind"),
        (SVC + "mode = 'udp'\n", r"services\.web\.mode"),
        (SVC + "balance = 'static-rr'\n", r"services\.web\.balance"),
        (SVC + "balance = 'roundrobin\\nlisten x'\n", r"services\.web\.balance"),
        (SVC + "mode = 'tcp'\nbalance = 'uri'\n", r"services\.web\.balance: 'uri' needs mode"),
        (SVC + "server_options = 'weight 5'\n", r"services\.web\.server_options: 'weight' is"),
        (SVC + "server_options = 'disabled'\n", r"services\.web\.server_options"),
        (SVC + "server_options = 'check'\n", r"services\.web\.server_options"),
        (SVC + "server_options = 'maxconn'\n", r"needs a value"),
        (SVC + "server_options = 'maxconn x'\n", r"'x' is not a valid value for 'maxconn'"),
        (SVC + 'server_options = "maxconn 1\\nlisten evil"\n', r"control character 0x0a"),
        (SVC + 'server_options = "maxconn 1\\r"\n', r"control character 0x0d"),
        (SVC + 'server_options = "maxconn 1\\u0000"\n', r"control character 0x00"),
        (SVC + 'server_options = "maxconn\\t1 send-proxy\\u00a0"\n', r"control character 0xa0"),
        (SVC + "server_options = 'maxconn 1 # x'\n", r"'#' is not an allowed keyword"),
        (SVC + "server_options = 'inter 2s#x'\n", r"not a valid value for 'inter'"),
        # what haproxy -c refuses, refused here first (a first start has nothing to fall
        # back on): a zero interval, a timer past 2^31 - 1 ms, an unknown multiplexer,
        # verification without a CA
        (SVC + "server_options = 'inter 0'\n", r"'0' is not a valid value for 'inter'"),
        (SVC + "check_options = 'fastinter 0us'\n", r"not a valid value for 'fastinter'"),
        (SVC + "server_options = 'slowstart 999999999d'\n", r"not a valid value for 'slowstart'"),
        (SVC + "server_options = 'proto foo'\n", r"'foo' is not a valid value for 'proto'"),
        (SVC + "server_options = 'ssl verify required'\n", r"needs a 'ca-file'"),
        (SVC + "server_options = 'ca-file \"/x\"'\n", r"not a valid value for 'ca-file'"),
        (SVC + "server_options = 'ca-file /x\\\\y'\n", r"not a valid value for 'ca-file'"),
        (SVC + 'server_options = "maxconn 1\\u2028"\n', r"control character"),
        (SVC + "server_options = 'maxconn 1 maxconn 2'\n", r"given twice"),
        (SVC + "server_options = 5\n", r"services\.web\.server_options: must be a string"),
        (SVC + "server_options = 'addr 192.0.2.1'\n", r"'addr' is not an allowed"),
        (SVC + "check_options = 'inter 1s'\n", r"services\.web\.check_options: needs check"),
        (SVC + "check = true\ncheck_options = 'maxconn 1'\n", r"check_options: 'maxconn'"),
        (SVC + "check = true\ncheck_options = 'port 0'\n", r"check_options: '0' is not"),
        (SVC + "check = 'yes'\n", r"services\.web\.check: must be true or false"),
        (SVC + "check = true\nserver_options = 'inter 2s'\ncheck_options = 'inter 1s'\n",
         r"check_options: 'inter' is also in server_options"),
        (SVC + f"server_options = '{LONG_SERVER}'\ncheck = true\ncheck_options = "
         "'inter 1s fastinter 1s downinter 1s rise 1 fall 1 port 1 check-ssl'\n",
         r"server_options: more than 50 words"),
        (SVC + "server_options = '-maxconn 1'\n", r"'-maxconn' is not an allowed"),
        (SVC + "httpchk = '/health'\n", r"services\.web\.httpchk: needs check"),
        (SVC + "check = true\nhttpchk = 'health'\n", r"services\.web\.httpchk"),
        (SVC + "check = true\nhttpchk = '/a b'\n", r"services\.web\.httpchk"),
        (SVC + "check = true\nhttpchk = '/a#b'\n", r"services\.web\.httpchk"),
        (SVC + "check = true\nhttpchk = '/a\"'\n", r"services\.web\.httpchk"),
        (SVC + "timeouts = { bogus = 1 }\n", r"services\.web\.timeouts\.bogus: unknown"),
        (SVC + "timeouts = { http_request = 'x' }\n", r"services\.web\.timeouts\.http_request"),
        (SVC + "timeouts = 5\n", r"services\.web\.timeouts: must be a table"),
        (SVC + "tags = 'blue'\n", r"services\.web\.tags"),
        (SVC + "tags = ['Blue']\n", r"services\.web\.tags"),
        (SVC + "tags = ['a\\nb']\n", r"services\.web\.tags"),
        (SVC + "slots = 0\n", r"services\.web\.slots"),
        (SVC + "maxconn = -1\n", r"services\.web\.maxconn"),
        (SVC + "[services.api]\nport = 18000\n", r"services\.web\.port: 127\.0\.0\.1:18000 is "
                                                 r"already used by services\.api"),
        (SVC + "[watcher]\nstats_port = 18000\n", r"services\.web\.port: .* watcher"),
        (SVC + "[services.api]\nport = 18000\nbind = '0.0.0.0'\n", r"already used"),
        (SVC + "[services.api]\nport = 18000\nbind = '::'\n", r"already used"),
    ],
)  # fmt: skip
def test_bad_files(tmp_path: Path, text: str, match: str) -> None:
    bad(tmp_path, text, match)


def test_error_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"discovery\.toml: services\.web\.mode"):
        load(tmp_path, SVC + "mode = 'udp'\n")
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_watcher_config(tmp_path / "nope.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"bin\.toml"):
        load_watcher_config(tmp_path / "bin.toml")


def test_same_port_on_different_addresses_is_fine(tmp_path: Path) -> None:
    cfg = load(tmp_path, SVC + "[services.api]\nport = 18000\nbind = '127.0.0.2'\n")
    assert {s.bind for s in cfg.services.values()} == {"127.0.0.1", "127.0.0.2"}


def test_every_whitelisted_keyword_is_accepted() -> None:
    examples = {"inter": "2s", "fastinter": "500ms", "downinter": "10s", "slowstart": "30s",
                "pool-purge-delay": "5s", "tcp-ut": "30s", "ca-file": "/etc/ssl/ca.pem",
                "alpn": "h2,http/1.1", "check-alpn": "h2", "proto": "h2", "check-proto": "h2",
                "check-sni": "example.org", "addr": "192.0.2.1", "port": "8081"}  # fmt: skip
    for keywords, check_only in ((SERVER_KEYWORDS, False), (CHECK_KEYWORDS, True)):
        for word, check in keywords.items():
            tokens = [word] if check is None else [word, examples.get(word, "")]
            if check is not None and not tokens[1]:
                tokens[1] = next(v for v in ("1", "none", "layer4", "fastinter", "auto",
                                             "TLSv1.2", "shutdown-sessions",
                                             "shutdown-backup-sessions") if check(v))  # fmt: skip
            assert parse_options("x", " ".join(tokens), check_only) == tuple(tokens)


def test_options_as_list() -> None:
    assert parse_options("x", ["maxconn 1", "send-proxy"]) == ("maxconn", "1", "send-proxy")
    with pytest.raises(ConfigError, match="x: must be a string"):
        parse_options("x", ["maxconn", 1])


def test_service_config_normalises() -> None:
    raw: dict[str, Any] = {"server_options": "maxconn 1", "tags": ["b", "a", "b"],
                           "timeouts": {"server": "2s", "connect": 100}}  # fmt: skip
    svc = ServiceConfig("web", 18000, bind="::0001", **raw)
    assert svc.bind == "::1" and svc.server_options == ("maxconn", "1")
    assert list(svc.timeouts.items()) == [("connect", 100), ("server", 2000)]
    assert svc.tags == ("a", "b")


def test_tag_filter() -> None:
    def inst(*tags: str, service: str = "web") -> Instance:
        return Instance(service, "h:abc:80", "h", "192.0.2.1", 80, tags=tuple(sorted(tags)))

    svc = ServiceConfig("web", 18000, tags=("blue",))
    assert svc.accepts(inst("blue")) and svc.accepts(inst("blue", "canary"))
    assert not svc.accepts(inst("green")) and not svc.accepts(inst())
    assert not svc.accepts(inst("blue", service="api"))
    assert ServiceConfig("web", 18000).accepts(inst())


@pytest.mark.parametrize(
    ("arg", "bind", "port"),
    [("web:18000", "127.0.0.1", 18000), ("web:127.0.0.2:18000", "127.0.0.2", 18000),
     ("web:[::1]:18000", "::1", 18000), ("web:0.0.0.0:80", "0.0.0.0", 80)],
)  # fmt: skip
def test_parse_service_arg(arg: str, bind: str, port: int) -> None:
    svc = parse_service_arg(arg)
    assert (svc.name, svc.bind, svc.port) == ("web", bind, port)


@pytest.mark.parametrize(
    "arg",
    ["web", "web:", ":18000", "web:0", "web:x", "Web:1", "web:localhost:1", "web:::1:80",
     "web:1:2:3", "web:18000\n", "web\n:1", "w" * 400, "web:[::1:80", "web_x:1"],
)  # fmt: skip
def test_parse_service_arg_bad(arg: str) -> None:
    with pytest.raises(ConfigError, match="--service") as err:
        parse_service_arg(arg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("50ms:500ms", (0.05, 0.5)), ("1s", (1.0, 4.0)), ("0:1s", (0.0, 1.0)),
     ("100ms:100ms", (0.1, 0.1)), ("2:5", (2.0, 5.0)), ("1m:10m", (60.0, 600.0))],
)  # fmt: skip
def test_parse_wait(value: str, expected: tuple[float, float]) -> None:
    assert parse_wait(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["", "1s:", ":1s", "2s:1s", "0", "0:0", "1s:2s:3s", "x",
                                   "1h", "-1s", "1s:11m"])  # fmt: skip
def test_parse_wait_bad(value: str) -> None:
    with pytest.raises(ConfigError, match="--wait"):
        parse_wait(value)


@pytest.mark.parametrize(
    ("value", "unit", "seconds"),
    [("500ms", "s", 0.5), ("2s", "s", 2.0), ("1m", "s", 60.0), ("1.5", "s", 1.5),
     ("1h", "s", 3600.0), (" 2S ", "s", 2.0), (3, "s", 3.0), (250, "ms", 0.25),
     ("250", "ms", 0.25), ("100us", "s", 0.0001), (0.5, "s", 0.5)],
)  # fmt: skip
def test_parse_duration(value: Any, unit: str, seconds: float) -> None:
    assert parse_duration("x", value, default_unit=unit) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "s", "1x", "1 s s", "-1s", "1e3", "1,5s", "1s\nx", True,
                                   None, [1], "9" * 40])  # fmt: skip
def test_parse_duration_bad(value: Any) -> None:
    with pytest.raises(ValidationError, match=r"x: .*not a duration"):
        parse_duration("x", value)


def test_parse_duration_bounds() -> None:
    with pytest.raises(ValidationError, match="not between 50ms and 1h"):
        parse_duration("x", "10ms", minimum=0.05, maximum=3600)
    with pytest.raises(ValidationError, match="not between 50ms and 1h"):
        parse_duration("x", "2h", minimum=0.05, maximum=3600)
    assert parse_duration("x", "50ms", minimum=0.05) == pytest.approx(0.05)


def test_format_duration_and_ms() -> None:
    assert [format_duration(s) for s in (0.05, 1, 90, 3600, 86400, 0.0001, 0, 1.5)] == [
        "50ms", "1s", "90s", "1h", "1d", "100us", "0s", "1500ms",
    ]  # fmt: skip
    assert (to_ms(0.0001), to_ms(0), to_ms(2.5)) == (1, 0, 2500)


def test_merge(tmp_path: Path) -> None:
    file_cfg = load(tmp_path, FULL)
    merged = merge(file_cfg, ["web:19000", "api:19001"])
    assert list(merged.services) == ["api", "db", "web"]
    web = merged.services["web"]
    assert (web.port, web.bind, web.balance, web.httpchk) == (19000, "127.0.0.1", "leastconn",
                                                              "/health")  # fmt: skip
    db = merge(file_cfg, ["db:15000"]).services["db"]
    assert (db.bind, db.port, db.mode) == ("127.0.0.2", 15000, "tcp")  # file's bind kept
    db = merge(file_cfg, ["db:127.0.0.3:15000"]).services["db"]
    assert db.bind == "127.0.0.3"
    db = merge(file_cfg, ["db:127.0.0.1:15000"]).services["db"]  # the default, named: it wins
    assert db.bind == "127.0.0.1"
    assert merged.maxconn == file_cfg.maxconn and merge(file_cfg, []) == file_cfg


def test_merge_errors(tmp_path: Path) -> None:
    file_cfg = load(tmp_path, FULL)
    with pytest.raises(ConfigError, match="given twice"):
        merge(file_cfg, ["x:1", "x:2"])
    with pytest.raises(ConfigError, match="already used"):
        merge(file_cfg, ["api:18000"])
    with pytest.raises(ConfigError, match="already used"):
        merge(file_cfg, ["api:8404"])  # the stats port


def test_from_dict_and_direct_construction() -> None:
    cfg = watcher_config_from_dict({"services": {"web": {"port": 1}}, "dns": {"x": 1}})
    assert cfg.services["web"].port == 1
    with pytest.raises(ConfigError, match="key and service name differ"):
        WatcherConfig(services={"api": ServiceConfig("web", 1)})
    with pytest.raises(ConfigError, match=r"watcher\.wait"):
        WatcherConfig(wait_min=1.0, wait_max=0.5)
    with pytest.raises(ConfigError, match=r"watcher\.template"):
        WatcherConfig(template=5)  # type: ignore[arg-type]
