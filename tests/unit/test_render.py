"""Rendering the HAProxy config: golden files (each checked by `haproxy -c`), determinism,
user templates and broken ones, and the renderer's dict lookups against Jinja's sandbox."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from discovery.errors import DiscoveryError, RenderError
from discovery.model import Instance, State
from discovery.watcher.config import CHECK_KEYWORDS, SERVER_KEYWORDS, ServiceConfig, WatcherConfig
from discovery.watcher.render import (
    DEFAULT_TEMPLATE,
    Renderer,
    RuntimePaths,
    build_context,
    render_config,
)
from discovery.watcher.slots import MAX_SLOTS, Slot, SlotTable, slot_count
from discovery.watcher.supervisor import validate_config
from tests.harness.util import require_tool

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
    assert "    server s1 192.0.2.1:8080 id 1 weight 100 check inter 1s" in text
    assert "    server s3 192.0.2.3:8080 id 3 weight 0 check" in text  # draining: weight 0
    assert "server s4 127.0.0.1:1 id 4 weight 0 disabled check" in text
    assert "server s1 [fd00::4]:5432 id 1 weight 100" in text and "bind [::1]:15432" in text
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


def test_the_largest_backend_passes_haproxy_check_well_within_its_timeout(
        tmp_path: Path) -> None:
    """A backend of ``MAX_SLOTS`` servers (a runaway writer's service) is checked by
    ``haproxy -c`` well within the watcher's own check timeout: each server line names its
    id (HAProxy 2.6 assigning them itself took 36-41 s at 65,536, past the 20 s timeout, so
    no host routing that service could reload or start HAProxy again)."""
    cfg = WatcherConfig(services={"web": ServiceConfig("web", 18000)})
    slots = [Slot(SlotTable.name(n)) for n in range(MAX_SLOTS)]
    path = tmp_path / "big.cfg"
    path.write_text(Renderer().render(build_context(cfg, {"web": slots}, PATHS)))
    start = time.monotonic()
    validate_config(require_tool("haproxy", "haproxy"), path)
    took = time.monotonic() - start
    assert took < 20.0 / 4, f"haproxy -c took {took:.1f} s"  # the check's timeout, a quarter
