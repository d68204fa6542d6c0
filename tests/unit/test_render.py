"""Rendering the HAProxy config: golden files (each checked by `haproxy -c`), determinism,
hostile values, broken templates, and the server-state file across a real reload."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import unicodedata
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.errors import ConfigError, DiscoveryError, RenderError, ValidationError
from discovery.model import Instance, State
from discovery.watcher.config import CHECK_KEYWORDS, SERVER_KEYWORDS, ServiceConfig, WatcherConfig
from discovery.watcher.render import (
    DEFAULT_TEMPLATE,
    Renderer,
    RuntimePaths,
    _check_value,
    build_context,
    render_config,
    unsafe_reason,
)
from discovery.watcher.slots import Slot, SlotTable, slot_count
from tests.harness.util import free_port, require_tool, wait_for

GOLDEN = Path(__file__).parent / "golden"
PATHS = RuntimePaths("/run/discovery/haproxy.sock")
FULL_PATHS = RuntimePaths(
    "/run/discovery/haproxy.sock", "/run/discovery/haproxy.state", "/run/discovery/haproxy.pid"
)


def inst(service: str, n: int, /, **kw: Any) -> Instance:
    values: dict[str, Any] = {
        "service": service,
        "id": f"host{n}:{n:012x}:8080",
        "node": f"host{n}",
        "address": f"192.0.2.{n}",
        "port": 8080,
        "registered_at": 1.0,
    }
    values.update(kw)
    return Instance(**values)


def table(instances: list[Instance], minimum: int = 8) -> list[Slot]:
    t = SlotTable(slot_count(len(instances), minimum))
    assert t.assign({i.id: i for i in instances}) is not None
    return t.slots()


def case_empty() -> tuple[WatcherConfig, dict[str, list[Slot]], RuntimePaths]:
    return WatcherConfig(), {}, PATHS


def case_basic() -> tuple[WatcherConfig, dict[str, list[Slot]], RuntimePaths]:
    cfg = WatcherConfig(services={"web": ServiceConfig("web", 18000)}, stats_port=18404)
    return cfg, {"web": table([inst("web", n) for n in (1, 2, 3)])}, FULL_PATHS


def case_mixed() -> tuple[WatcherConfig, dict[str, list[Slot]], RuntimePaths]:
    web = ServiceConfig(
        "web",
        18000,
        check=True,
        check_options=("inter", "1s", "fall", "2", "rise", "1"),
        httpchk="/health?full=1",
        server_options=("maxconn", "100", "slowstart", "10s"),
        timeouts={"client": 30000, "server": 45000, "http-request": 5000},
        maxconn=2000,
        tags=("blue",),
    )
    db = ServiceConfig(
        "db", 15432, bind="::1", mode="tcp", balance="source", timeouts={"tunnel": 3600000}
    )
    cache = ServiceConfig("cache", 16379, bind="127.0.0.2", mode="tcp", balance="leastconn")
    cfg = WatcherConfig(services={"web": web, "db": db, "cache": cache})
    web_slots = table(
        [
            inst("web", 1, tags=("blue",)),
            inst("web", 2, tags=("blue", "canary"), weight=10),
            inst("web", 3, tags=("blue",), state=State.DRAINING),
        ]
    )
    db_slots = table([inst("db", 4, address="fd00::4", port=5432)], minimum=2)
    return cfg, {"web": web_slots, "db": db_slots, "cache": table([], minimum=1)}, FULL_PATHS


def case_tuned() -> tuple[WatcherConfig, dict[str, list[Slot]], RuntimePaths]:
    api = ServiceConfig("api", 18080, bind="0.0.0.0", balance="uri", slots=4)
    cfg = WatcherConfig(
        services={"api": api},
        maxconn=500,
        timeouts={"connect": 1000, "client": 120000, "server": 120000, "queue": 3000},
    )
    return cfg, {"api": table([inst("api", n, weight=n * 50) for n in (1, 2)], 4)}, PATHS


CASES = {"empty": case_empty, "basic": case_basic, "mixed": case_mixed, "tuned": case_tuned}


def haproxy_check(path: Path, allow_warnings: bool = False) -> None:
    out = subprocess.run(
        [require_tool("haproxy", "haproxy"), "-c", "-f", str(path)], capture_output=True,
        text=True, timeout=30,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    warnings = [line for line in text.splitlines() if "[WARNING]" in line or "[ALERT]" in line]
    assert all("server state file" in w or allow_warnings for w in warnings), text


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    cfg, slots, paths = CASES[name]()
    text = render_config(cfg, slots, paths)
    golden = GOLDEN / f"{name}.cfg"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden} differs; UPDATE_GOLDEN=1 to regenerate"
    haproxy_check(golden)


EXAMPLES = {"inter": "2s", "fastinter": "500ms", "downinter": "10s", "slowstart": "30s",
            "pool-purge-delay": "5s", "tcp-ut": "30s", "alpn": "h2,http/1.1", "proto": "h2",
            "check-alpn": "h2", "check-proto": "h2", "check-sni": "example.org",
            "addr": "192.0.2.1", "port": "8081", "verify": "none", "max-reuse": "-1",
            "ca-file": "/etc/ssl/certs/ca-certificates.crt"}  # fmt: skip
FALLBACKS = ("1", "layer4", "fastinter", "auto", "TLSv1.2", "shutdown-sessions",
             "shutdown-backup-sessions")  # fmt: skip


def option_tokens(keywords: Mapping[str, Any], skip: set[str]) -> tuple[str, ...]:
    out: list[str] = []
    for word, check in keywords.items():
        if word in skip:
            continue
        out.append(word)
        if check is not None:
            out.append(EXAMPLES.get(word) or next(v for v in FALLBACKS if check(v)))
    return tuple(out)


def test_every_whitelisted_keyword_passes_haproxy(tmp_path: Path) -> None:
    """The whitelist holds only keywords HAProxy 2.6 accepts, and a maximal line fits."""
    if not Path(EXAMPLES["ca-file"]).is_file():
        EXAMPLES["ca-file"] = str(tmp_path / "ca.pem")
        shutil.copy(DEFAULT_TEMPLATE, EXAMPLES["ca-file"])  # pragma: no cover
    chunks: list[tuple[str, ...]] = [option_tokens(CHECK_KEYWORDS, set()), ()]
    for token in option_tokens(SERVER_KEYWORDS, set(CHECK_KEYWORDS)):
        if token in SERVER_KEYWORDS and len(chunks[-1]) >= 40:
            chunks.append(())
        chunks[-1] += (token,)
    services = {
        f"svc{n}": ServiceConfig(f"svc{n}", 18000 + n, check=n == 0,
                                 check_options=opts if n == 0 else (),
                                 httpchk="/health" if n == 0 else None,
                                 server_options=opts if n else ("verify", "none"))
        for n, opts in enumerate(chunks)
    }  # fmt: skip
    cfg = WatcherConfig(services=services)
    slots = {n: [Slot.of("s1", inst(n, 1, id="h1:abc:80"))] for n in services}
    conf = tmp_path / "all.cfg"
    conf.write_text(render_config(cfg, slots, PATHS))
    assert max(len(line.split("#")[0].split()) for line in conf.read_text().splitlines()) <= 64
    haproxy_check(conf, allow_warnings=True)  # e.g. "tfo" wants retry-on: semantics, not syntax


def test_golden_shape() -> None:
    text = (GOLDEN / "mixed.cfg").read_text()
    assert "backend web\n" in text and "frontend svc_web\n" in text
    assert "    server s1 192.0.2.1:8080 weight 100 check inter 1s" in text
    assert "    server s3 192.0.2.3:8080 weight 0 check" in text  # draining: weight 0, not maint
    assert "server s4 127.0.0.1:1 weight 0 disabled check" in text
    assert "server s1 [fd00::4]:5432 weight 100" in text and "bind [::1]:15432" in text
    assert "hash-type consistent" in text  # balance source must allow runtime weights
    assert "    timeout http-request 5000ms" in text


def test_deterministic_and_order_independent() -> None:
    cfg, slots, paths = case_mixed()
    first = render_config(cfg, slots, paths).encode()
    assert render_config(cfg, slots, paths).encode() == first
    reordered = replace(cfg, services=dict(reversed(list(cfg.services.items()))))
    assert render_config(reordered, dict(reversed(list(slots.items()))), paths).encode() == first
    renderer = Renderer()
    assert renderer.render(build_context(cfg, slots, paths)).encode() == first


def test_default_template_is_package_data() -> None:
    assert DEFAULT_TEMPLATE.is_file()
    assert DEFAULT_TEMPLATE.parent.name == "templates"
    assert Renderer().template_path == DEFAULT_TEMPLATE


def test_context_shape() -> None:
    cfg, slots, paths = case_mixed()
    ctx = build_context(cfg, slots, paths)
    assert [s["name"] for s in ctx["services"]] == ["cache", "db", "web"]
    web = ctx["services"][2]
    assert [s["name"] for s in web["slots"]] == [f"s{n}" for n in range(1, 9)]
    drain = web["slots"][2]
    assert (drain["state"], drain["weight"], drain["instance_weight"]) == ("drain", 0, 100)
    assert web["slots"][7] == {
        "name": "s8", "address": "127.0.0.1", "port": 1, "endpoint": "127.0.0.1:1",
        "weight": 0, "instance_weight": 0, "state": "maint", "disabled": True, "instance_id": "",
    }  # fmt: skip
    assert web["frontend_timeouts"] == {"client": 30000, "http-request": 5000}
    assert web["backend_timeouts"] == {"server": 45000}
    assert ctx["paths"]["state_file"] == "/run/discovery/haproxy.state"
    assert ctx["stats"] is None


def test_missing_slots_for_a_service() -> None:
    cfg, slots, paths = case_basic()
    with pytest.raises(RenderError, match="web: no slots"):
        build_context(cfg, {}, paths)
    with pytest.raises(RenderError, match="web: no slots"):
        build_context(cfg, {"web": []}, paths)
    build_context(cfg, {**slots, "other": []}, paths)  # unconfigured services: ignored


# --- hostile values ------------------------------------------------------------------

HOSTILE = [
    "web\nlisten evil",
    "web\rx",
    "web#x",
    'we"b',
    "we'b",
    "web x",
    "we\\b",
    "web\u2028x",
    "web\x85x",
    "web\u200bx",
    "web\x00",
    "w" * 5000,
    "wéb",
]
# refused in any free-text field (meta too): line breaks, controls, format chars, huge values
LINE_BREAKING = ["web\nlisten evil", "web\rx", "web\u2028x", "web\x85x", "web\x00", "web\u200bx",
                 "w" * 5000]
UNSAFE = [v for v in HOSTILE if v not in ("web x", "wéb", "w" * 5000)]  # refused by Renderer


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_instance_values_never_validate(value: str) -> None:
    for field in ("service", "address", "id", "node"):
        with pytest.raises(ValidationError):
            inst("web", 1, **{field: value})
    with pytest.raises(ValidationError):
        inst("web", 1, tags=(value,))
    if value in LINE_BREAKING:
        with pytest.raises(ValidationError):
            inst("web", 1, meta={"k": value})
    else:  # free text may hold '#' or quotes; meta never reaches the config
        cfg, _, paths = case_basic()
        text = render_config(cfg, {"web": table([inst("web", 1, meta={"k": value})])}, paths)
        assert value not in text


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("field", ["name", "address", "instance_id", "state"])
def test_hostile_slot_values_rejected_by_build_context(field: str, value: str) -> None:
    cfg, slots, paths = case_basic()
    bad = replace(slots["web"][0], **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as err:
        build_context(cfg, {"web": [bad, *slots["web"][1:]]}, paths)
    assert "web" in err.value.culprit


@pytest.mark.parametrize(("field", "value"), [("port", "8080\n"), ("port", 0), ("port", 70000),
                                              ("port", True), ("weight", 257), ("weight", "1 x"),
                                              ("weight", -1), ("name", "s2")])  # fmt: skip
def test_bad_slot_numbers(field: str, value: object) -> None:
    cfg, slots, paths = case_basic()
    bad = replace(slots["web"][0], **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        build_context(cfg, {"web": [bad, *slots["web"][1:]]}, paths)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_service_names(value: str) -> None:
    with pytest.raises(ConfigError):
        ServiceConfig(value, 18000)
    cfg, slots, paths = case_basic()
    object.__setattr__(cfg.services["web"], "name", value)  # bypass the dataclass check
    with pytest.raises(ValidationError):
        build_context(cfg, slots, paths)


@pytest.mark.parametrize("value", ["maxconn 1\nlisten x", "maxconn 1 #", "maxconn '1'"])
def test_tampered_options_refused_at_render(value: str) -> None:
    cfg, slots, paths = case_basic()
    object.__setattr__(cfg.services["web"], "server_options", tuple(value.split(" ")))
    ctx = build_context(cfg, slots, paths)
    with pytest.raises(RenderError, match=r"context\.services\[0\]\.server_options"):
        Renderer().render(ctx)


@pytest.mark.parametrize("value", UNSAFE)
def test_render_refuses_hostile_context_values(value: str) -> None:
    cfg, slots, paths = case_basic()
    ctx = build_context(cfg, slots, paths)
    ctx["services"][0]["slots"][0]["address"] = value
    with pytest.raises(RenderError, match=r"services\[0\]\.slots\[0\]\.address"):
        Renderer().render(ctx)
    ctx = build_context(cfg, slots, paths)
    ctx["paths"]["admin_socket"] = value
    with pytest.raises(RenderError, match=r"paths\.admin_socket"):
        Renderer().render(ctx)


def _unsafe(text: str) -> bool:
    """The rule, character by character: HAProxy's quoting characters and every control,
    format, separator, surrogate, private-use or unassigned code point."""
    return any(ch in "#'\"\\" or unicodedata.category(ch) in
               {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"} for ch in text)


@pytest.mark.parametrize("ch", [chr(c) for c in range(128)]
                         + list("\x80\x85\xa0é\u2028\u2029\u200b\ufeff\ue000\U0010ffff"))
def test_the_context_check_refuses_exactly_the_rule(ch: str) -> None:
    """Each ASCII character and the non-ASCII edges, alone in an otherwise plain context."""
    ctx = {"services": [{"name": f"ab{ch}cd", "port": 1}], "tags": ("x", None)}
    if _unsafe(ch):
        with pytest.raises(RenderError, match=r"refusing to render ctx\.services\[0\]\.name"):
            _check_value(ctx, "ctx")
    else:
        _check_value(ctx, "ctx")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.text(max_size=8), max_size=4), st.text(max_size=8),
       st.sampled_from([None, 1, 2.5, True]))
def test_the_check_in_one_call_agrees_with_the_rule(values: list[str], key: str,
                                                    number: object) -> None:
    """The context check proves a plain context safe in one regex call over all its strings;
    it refuses exactly what the rule refuses, and names where."""
    ctx = {"services": [{"name": v, "port": number} for v in values], key: tuple(values)}
    if any(_unsafe(s) for s in [*values, key]):
        with pytest.raises(RenderError, match=r"refusing to render ctx"):
            _check_value(ctx, "ctx")
    else:
        _check_value(ctx, "ctx")


@pytest.mark.parametrize("ch", ["\x0b", "\x00", "\x7f", "\x85", "\u2028", "\ufeff", "\t"])
def test_a_template_writing_a_control_character_is_refused(tmp_path: Path, ch: str) -> None:
    """The rendered text, the template's own literal text included: tabs only (a ``\\r``
    in a template file reads as a line break: Jinja reads it with universal newlines)."""
    template = tmp_path / "t.cfg.j2"
    template.write_text(f"global\n\tmaxconn 10\nlisten a{ch}b\n")
    if ch == "\t":
        assert Renderer(template).render({}) == "global\n\tmaxconn 10\nlisten a\tb\n"
        return
    with pytest.raises(RenderError, match=r"t\.cfg\.j2: rendered line 3: control character"):
        Renderer(template).render({})


def test_the_context_check_meets_a_shared_or_cyclic_container_once() -> None:
    shared = {"team": "payments"}
    loop: list[object] = ["x"]
    loop.append(loop)
    _check_value({"a": shared, "b": [shared, shared], "c": loop}, "ctx")  # terminates, passes
    bad: list[object] = ["y#"]
    bad.append(bad)
    with pytest.raises(RenderError, match=r"ctx\.c\[0\] = 'y#'"):
        _check_value({"a": shared, "c": bad}, "ctx")


def test_render_refuses_odd_types_and_keys() -> None:
    ctx = build_context(*case_basic())
    with pytest.raises(RenderError, match="unsupported type"):
        Renderer().render({**ctx, "extra": object()})
    with pytest.raises(RenderError, match="bad key"):
        Renderer().render({**ctx, "extra": {"a\nb": 1}})


@pytest.mark.parametrize(
    "path", ["relative.sock", "/tmp/with space", "/tmp/x\n", "/tmp/a#b", "/" + "a" * 200]
)
def test_runtime_paths_validated(path: str) -> None:
    with pytest.raises(ConfigError, match="admin_socket"):
        RuntimePaths(path)
    with pytest.raises(ConfigError):
        RuntimePaths("/run/ok.sock", state_file=path if len(path) < 100 else "x")


def test_unsafe_reason() -> None:
    assert unsafe_reason("maxconn 100 inter 2s") is None
    assert unsafe_reason("192.0.2.1") is None
    for bad in UNSAFE:
        assert unsafe_reason(bad), bad


# --- user templates ------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "my.cfg.j2") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_user_template(tmp_path: Path) -> None:
    path = write(tmp_path, "{% for s in services %}{{ s.name }} {{ s.slots|length }}\n{% endfor %}")
    assert render_config(replace(case_basic()[0], template=str(path)), *case_basic()[1:]) == (
        "web 8\n"
    )


def test_template_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "global\n    maxconn 1\n{% for s in services %}\n")
    with pytest.raises(RenderError, match=rf"{path}:3.*syntax error"):
        Renderer(path)


def test_template_undefined_variable_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "global\n\n    maxconn {{ watcher.maxcon }}\n")
    with pytest.raises(RenderError, match=rf"{path}:3: undefined.*maxcon"):
        Renderer(path).render(build_context(*case_basic()))
    path = write(tmp_path, "{% if nothing %}x{% endif %}\n", "b.j2")
    with pytest.raises(RenderError, match=rf"{path}:1: undefined"):
        Renderer(path).render(build_context(*case_basic()))


def test_template_runtime_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "a\nb\n{{ 1 + 'x' }}\n")
    with pytest.raises(RenderError, match=rf"{path}:3: TypeError"):
        Renderer(path).render(build_context(*case_basic()))


@pytest.mark.parametrize("expr", ["services[0].name ~ '\\n  listen x'", "'#' ~ 1", "none_value"])
def test_template_computed_values_are_checked(tmp_path: Path, expr: str) -> None:
    path = write(tmp_path, "x\n{{ " + expr + " }}\n")
    ctx = {**build_context(*case_basic()), "none_value": None}
    with pytest.raises(RenderError, match=rf"{path}:2"):
        Renderer(path).render(ctx)


def test_template_literal_control_characters_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "global\n    maxconn 1\u2028listen x\n")
    with pytest.raises(RenderError, match="line 2"):
        Renderer(path).render(build_context(*case_basic()))


def test_missing_template(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="not found"):
        Renderer(tmp_path / "nope.j2")
    with pytest.raises(DiscoveryError):
        render_config(replace(WatcherConfig(), template=str(tmp_path / "nope.j2")), {}, PATHS)


# --- server-state file -----------------------------------------------------------------

STATE_HEADER = (
    "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
    "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
    "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr "
    "srv_agent_port\n"
)


def state_line(srv: str, addr: str, port: int, admin: int, weight: int) -> str:
    return f"3 web 1 {srv} {addr} 2 {admin} {weight} {weight} 5 1 0 2 0 0 0 0 - {port} - 0 0 - - 0"


# --- a real HAProxy: drain survives a reload; a stale state file wins over the config ---


def admin(sock: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)  # the master CLI answers only then
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def servers(sock: Path) -> dict[str, tuple[str, int, str]]:
    """srv_name -> (addr, port, status) for backend web."""
    rows = [line.split() for line in admin(sock, "show servers state web").splitlines()[2:]]
    state = {f[3]: (f[4], int(f[18])) for f in rows if len(f) > 18}
    stats = [line.split(",") for line in admin(sock, "show stat").splitlines()]
    status = {f[1]: f[17] for f in stats if len(f) > 17 and f[0] == "web"}
    return {name: (*state[name], status[name]) for name in state}


def worker_pid(sock: Path) -> str:
    return next(line for line in admin(sock, "show info").splitlines() if line.startswith("Pid:"))


def test_reload_with_state_file(tmp_path: Path) -> None:
    """Why every reload renders each slot's current address and never relies on the
    server-state file: HAProxy 2.6 lets a stale state line win over the new config."""
    paths = RuntimePaths(tmp_path / "admin.sock", tmp_path / "state")
    cfg = WatcherConfig(services={"web": ServiceConfig("web", free_port())})
    a, b, c, d = (inst("web", n, port=20000 + n) for n in (1, 2, 3, 4))
    before = [Slot.of("s1", a), Slot.of("s2", b), Slot("s3"), Slot("s4")]
    # after: a left s1, b drains, c took s3 at runtime; then d arrives and (e.g. in a fresh,
    # bigger table) is given the freed s1
    after = [Slot.of("s1", d), Slot.of("s2", b.with_state(State.DRAINING)), Slot.of("s3", c),
             Slot("s4")]  # fmt: skip
    renderer = Renderer()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(renderer.render(build_context(cfg, {"web": before}, paths)))
    master = tmp_path / "master.sock"
    argv = [require_tool("haproxy", "haproxy"), "-W", "-S", f"{master},mode,600", "-f", str(conf)]
    proc = subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        sock = Path(paths.admin_socket)
        pid = wait_for(lambda: "master" in admin(master, "show proc") and worker_pid(sock), 10,
                       message="HAProxy master and worker up")
        # runtime, as the watcher would do it
        for cmd in ("set server web/s1 state maint", "set server web/s2 state drain",
                    "set server web/s3 addr 192.0.2.3 port 20003", "set weight web/s3 100",
                    "set server web/s3 state ready"):  # fmt: skip
            admin(sock, cmd)
        ctx = build_context(cfg, {"web": after}, paths)
        dump = admin(sock, "show servers state")
        Path(str(paths.state_file)).write_text(dump)
        conf.write_text(renderer.render(ctx))
        admin(master, "reload")
        wait_for(lambda: worker_pid(sock) != pid, 10, message="a new worker after the reload")
        got = wait_for(lambda: servers(sock), 10, message="the servers' state")
        assert got["s2"] == ("192.0.2.2", 20002, "DRAIN")  # weight 0 in the config: still drained
        assert got["s3"] == ("192.0.2.3", 20003, "no check")
        # HAProxy 2.6 lets the stale state win: in maint, and the *old* port
        assert got["s1"] == ("192.0.2.4", 20001, "MAINT")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        print(err.decode(errors="replace"))


@pytest.mark.parametrize("expr", [
    "d.a", "d.items() | list | length", "d.items is defined", "d.get('a')", "d['items']",
    "n.a", "d.__class__ is defined", "d.missing is defined", "l.a is defined",
])
def test_a_dict_lookup_renders_as_jinjas_own_sandbox(tmp_path: Path, expr: str) -> None:
    """The renderer takes ``x.name`` on a plain dict straight from the dict; Jinja's sandbox
    renders every one of these the same (an attribute of dict first, then the item)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    (tmp_path / "t.j2").write_text(f"{{{{ {expr} }}}}\n")
    context = {"d": {"a": "1", "items": "2"}, "n": _Attrs(), "l": ["a"]}
    jinja = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    expected = jinja.from_string(f"{{{{ {expr} }}}}\n").render(context)
    assert Renderer(tmp_path / "t.j2")._template.render(context) == expected


class _Attrs:
    a = "attr"
