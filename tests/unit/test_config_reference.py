"""docs/configuration.md is generated from the code and must stay in step with it.

A new flag, env var, config key or check type without a regenerated page fails here. Fix:

    .venv/bin/python scripts/gen_config_reference.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from discovery.agent.labels import parse_container
from discovery.errors import LabelError
from tests.harness.util import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_config_reference.py"
PAGE = ROOT / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def page(gen: ModuleType) -> str:
    text: str = gen.render()
    return text


def test_the_page_is_up_to_date() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0, (
        "docs/configuration.md is out of date; regenerate it with\n"
        "    .venv/bin/python scripts/gen_config_reference.py\n" + out.stderr[-4000:])


def test_everything_the_code_has_is_described(gen: ModuleType, page: str) -> None:
    assert gen.UNDOCUMENTED not in page, (
        "describe these in scripts/config_texts.py: " + "; ".join(gen.missing))


def test_the_output_does_not_depend_on_the_environment(gen: ModuleType, page: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCOVERY_REGISTRY", "etcd://elsewhere:2379/x")
    monkeypatch.setenv("DISCOVERY_TTL", "3")
    monkeypatch.setenv("COLUMNS", "40")
    assert gen.render() == page


def test_every_command_flag_and_env_var_is_on_the_page(page: str) -> None:
    from discovery.cli.app import main

    sections = {part.split("`", 1)[0]: part for part in page.split("### `discovery ")[1:]}
    for name, cmd in main.commands.items():
        assert name in sections, f"no section for discovery {name}"
        section = sections[name]
        for param in cmd.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("-"):
                    assert re.search(rf"[`, ]{re.escape(flag)}[`, ]", section), (name, flag)
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                assert f"`{envvar}`" in page, (name, envvar)


def _env_names_in(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for name in re.findall(r"\bDISCOVERY_[A-Z][A-Z0-9_]*", path.read_text()):
            if not name.endswith("_") and not name.startswith("DISCOVERY_BENCH"):
                names.add(name)
    return names


def test_every_env_var_the_code_or_the_image_reads_is_on_the_page(page: str) -> None:
    sources = [*sorted((ROOT / "discovery").rglob("*.py")),
               ROOT / "deploy" / "entrypoint.sh", ROOT / "deploy" / "healthcheck.py"]
    names = _env_names_in(sources)
    assert "DISCOVERY_REGISTRY" in names, "the scan of the sources found no env var"
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, f"environment variables not on docs/configuration.md: {missing}"


def _container(labels: dict[str, str], *, healthcheck: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {"Labels": labels, "ExposedPorts": {"8080/tcp": {}}, "Env": []}
    if healthcheck:
        config["Healthcheck"] = {"Test": ["CMD", "true"]}
    return {"Id": "0123456789ab" * 5, "Name": "/example", "Config": config,
            "HostConfig": {"NetworkMode": "host"}, "NetworkSettings": {}}


def test_every_documented_label_example_parses() -> None:
    texts = load_script(ROOT / "scripts" / "config_texts.py")
    assert texts.LABELS
    for label, _default, _meaning, example in texts.LABELS:
        labels = {"discovery.service": "web", **example}
        if "discovery.8080.service" in labels:
            del labels["discovery.service"]
        try:
            specs = parse_container(_container(labels))
        except LabelError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{label}: the documented example {example} is refused: {exc}")
        assert [s.service for s in specs] == ["web"], label


def test_documented_defaults_are_the_parsers(gen: ModuleType) -> None:
    (spec,) = parse_container(_container({"discovery.service": "web"}))
    assert (spec.port, spec.weight, spec.tags, spec.check.type) == (8080, 100, (), "tcp")
    (spec,) = parse_container(_container({"discovery.service": "web"}, healthcheck=True))
    assert spec.check.type == "docker"
    labels = {"SERVICE_NAME": "web", "SERVICE_TAGS": "a,b", "SERVICE_REGION": "eu"}
    (spec,) = parse_container(_container(labels))
    assert (spec.service, spec.tags, spec.meta) == ("web", ("a", "b"), {"region": "eu"})
