"""Rendering the HAProxy config: hostile values, each refused before it reaches the config."""

from __future__ import annotations

import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.errors import ConfigError, RenderError, ValidationError
from discovery.watcher.config import ServiceConfig
from discovery.watcher.render import (
    Renderer,
    RuntimePaths,
    _check_value,
    build_context,
    render_config,
    unsafe_reason,
)
from tests.unit.test_render import case_basic, inst, table

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
