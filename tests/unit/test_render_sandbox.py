"""Templates run in Jinja's immutable sandbox (issue 8, part B): an escape attempt is one
RenderError naming the template, nothing it asks for runs, and the last good config serves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from discovery.errors import RenderError
from discovery.model import Instance
from discovery.model.catalog import Catalog
from discovery.registry import Snapshot
from discovery.watcher import sandbox
from discovery.watcher.config import ServiceConfig, WatcherConfig
from discovery.watcher.render import DEFAULT_TEMPLATE, Renderer, RuntimePaths, render_config
from discovery.watcher.router import Router
from tests.harness.util import require_tool

PATHS = RuntimePaths("/run/discovery/haproxy.sock")

# Each would create MARKER outside the sandbox. The first is the payload of issue 8.
ESCAPES = [
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.__builtins__.open('MARKER', 'w') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ '{0.__init__.__globals__[os].system}'.format(cycler) }}",
    "{% set xs = [] %}{{ xs.append(1) }}",  # no mutation either (immutable sandbox)
]


def hostile(tmp_path: Path, payload: str) -> tuple[Path, Path]:
    marker = tmp_path / "escaped"
    template = tmp_path / "hostile.cfg.j2"
    template.write_text(DEFAULT_TEMPLATE.read_text() + "\n# "
                        + payload.replace("MARKER", str(marker)) + "\n")
    return template, marker


@pytest.mark.parametrize("payload", ESCAPES)
def test_escape_attempts_raise_render_error_and_run_nothing(tmp_path: Path, payload: str) -> None:
    template, marker = hostile(tmp_path, payload)
    with pytest.raises(RenderError) as err:
        render_config(WatcherConfig(), {}, PATHS, Renderer(template))
    message = str(err.value)
    assert str(template) in message, message
    assert "sandbox" in message or "unsafe" in message, message
    assert "\n" not in message
    assert not marker.exists()


def test_default_template_renders_in_the_sandbox() -> None:
    cfg = WatcherConfig(services={"web": ServiceConfig(name="web", port=18000)})
    from discovery.watcher.slots import SlotTable

    text = render_config(cfg, {"web": SlotTable(8).slots()}, PATHS)
    assert "backend web" in text and "server s8 " in text


def test_sandbox_violation_keeps_the_last_good_config(tmp_path: Path) -> None:
    require_tool("haproxy", "haproxy")  # the router checks what it renders with haproxy -c
    inst = Instance(service="web", id="h1:000000000001:80", node="h1", address="127.0.0.1",
                    port=8080, registered_at=1.0)
    catalog = Catalog()
    catalog.load(Snapshot(instances={inst.key: inst}, revision=1))
    good = WatcherConfig(services={"web": ServiceConfig(name="web", port=18000)})
    dest = tmp_path / "haproxy.cfg"
    router = Router(good, dest, RuntimePaths(str(tmp_path / "admin.sock")), None)
    assert router.sync(catalog) == "reload"
    installed = dest.read_text()
    assert "127.0.0.1:8080" in installed

    template, marker = hostile(tmp_path, ESCAPES[0])
    bigger = WatcherConfig(services={**good.services,
                                     "api": ServiceConfig(name="api", port=18001)})
    router.set_config(bigger, Renderer(template))
    assert router.sync(catalog) == "failed"
    assert dest.read_text() == installed
    assert str(template) in router.stats.last_error and router.stats.render_errors == 1
    assert not marker.exists()


def quadratic(tmp_path: Path) -> Path:
    """The default template, then a loop over every slot inside another, over a list that
    makes it ~10^10 steps: a template whose work grows faster than the catalog."""
    template = tmp_path / "quadratic.cfg.j2"
    template.write_text(DEFAULT_TEMPLATE.read_text() + "\n{% for a in range(100000) %}"
                        "{% for b in range(100000) %}{% if a.real == b.real %}{% endif %}"
                        "{% endfor %}{% endfor %}\n")
    return template


def test_a_runaway_template_is_stopped_at_its_limit_naming_its_line(tmp_path: Path) -> None:
    """It used to hold the watcher's thread for good (here: hours); now it stops at the limit
    with one RenderError naming the template's line, and the next render starts afresh."""
    template = quadratic(tmp_path)
    renderer = Renderer(template)
    cfg = WatcherConfig(services={"web": ServiceConfig(name="web", port=18000)})
    from discovery.watcher.render import build_context
    from discovery.watcher.slots import SlotTable

    context = build_context(cfg, {"web": SlotTable(8).slots()}, PATHS)
    for _ in range(2):  # the deadline is per render
        started = time.monotonic()
        with pytest.raises(RenderError) as err:
            renderer.render(context, limit=0.3)
        took = time.monotonic() - started
        assert 0.3 <= took < 1.0, took
        line = (DEFAULT_TEMPLATE.read_text() + "\n").count("\n") + 1  # the loop's
        assert f"{template}:{line}" in str(err.value), err.value
        assert "still rendering after 0.3 s" in str(err.value)


def test_a_template_writing_too_much_is_stopped(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "MAX_RENDER_BYTES", 1 << 20)
    template = tmp_path / "big.cfg.j2"
    template.write_text("{% for a in range(100000) %}{{ a }} padding padding padding\n"
                        "{% endfor %}")
    with pytest.raises(RenderError, match="wrote more than 1 MiB"):
        Renderer(template).render({})

