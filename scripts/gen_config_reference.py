#!/usr/bin/env python3
"""Write docs/configuration.md, the configuration reference, from the code.

    .venv/bin/python scripts/gen_config_reference.py           # (re)write the file
    .venv/bin/python scripts/gen_config_reference.py --check   # exit 1 if it is out of date

What comes from the code, and from where:

* every command, flag, environment variable, default and help text: the click command tree
  (``discovery.cli.main``), exactly what ``discovery COMMAND --help`` shows;
* the registry URL schemes, default ports and prefix, query parameters and environment
  variables: ``discovery.registry.url``;
* the config file keys and their defaults: ``discovery.agent.config`` (``[agent]``,
  ``[agent.check]``), ``discovery.watcher.config`` (``[watcher]``, ``[services.NAME]``,
  allowed modes, balance algorithms, timeouts, server and check keywords);
* the registrator names and the built-in check types: ``discovery.agent.labels`` and
  ``discovery.agent.checks``.

What is maintained by hand, in ``scripts/config_texts.py``, because the code has no list of
it: the meaning of config keys and check types, the label table (``labels.py`` parses label
*patterns*; it keeps no list of labels), options without help text, and the variables only
the container image reads. Anything the code has and that file does not describe is written
as ``UNDOCUMENTED`` and named on stderr; ``tests/unit/test_config_reference.py`` fails on it,
and on a stale file.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # config_cells, _files, _texts: beside it

import click  # noqa: E402
from config_cells import (  # noqa: E402  (UNDOCUMENTED, missing: read by the test too)
    UNDOCUMENTED,  # noqa: F401
    code,
    missing,
    number,
    table,
    undocumented,
    unset,
)
from config_files import (  # noqa: E402
    agent_file_section,
    labels_section,
    registry_url_section,
    watcher_file_section,
)
from config_texts import IMAGE_ENV, OPTION_HELP, OTHER_ENV  # noqa: E402

OUT = ROOT / "docs" / "configuration.md"
COMMAND = ".venv/bin/python scripts/gen_config_reference.py"
#: commands in reading order; commands not listed here follow, alphabetically
ORDER = ("agent", "watch", "up", "dns", "services", "show", "maint", "check-config")

_ENV_NOTE = re.compile(r"\s*\[env [A-Z0-9_, ]+\]")


def help_text(param: click.Parameter) -> str:
    return _ENV_NOTE.sub("", getattr(param, "help", None) or "").strip()


# ---- the click tree -------------------------------------------------------------------------


def commands() -> list[tuple[str, click.Command]]:
    from discovery.cli.app import main

    known = [n for n in ORDER if n in main.commands]
    rest = sorted(set(main.commands) - set(known))
    return [(n, main.commands[n]) for n in [*known, *rest]]


def borrowed_help(all_commands: list[tuple[str, click.Command]]) -> dict[tuple[str, str], str]:
    """(param name, flags) -> help, from whichever command has one (for repeats without)."""
    out: dict[tuple[str, str], str] = {}
    for _, cmd in all_commands:
        for p in cmd.params:
            text = help_text(p)
            if text and p.name:
                out.setdefault((p.name, " ".join(p.opts)), text)
    return out


def option_meaning(name: str, param: click.Parameter, borrowed: dict[tuple[str, str], str]
                   ) -> str:
    return (help_text(param) or OPTION_HELP.get(f"{name}:{param.name}")
            or OPTION_HELP.get(param.name or "")
            or borrowed.get((param.name or "", " ".join(param.opts)))
            or undocumented(f"option {' '.join(param.opts)} of `discovery {name}`"))


def flag_spelling(param: click.Option, ctx: click.Context) -> str:
    names = ", ".join(param.opts)
    if param.secondary_opts:
        names += " / " + ", ".join(param.secondary_opts)
    if param.is_flag:
        return names
    return f"{names} {param.make_metavar(ctx)}"


def default_spelling(param: click.Option) -> str:
    if param.required:
        return "required"
    if not param.expose_value:  # --version, --help: actions, not settings
        return "—"
    if isinstance(param.show_default, str):
        return param.show_default
    value = param.default
    if param.is_flag:
        return "on" if value is True else "off"
    if unset(value) or value == "" or value == ():
        return "—"
    if isinstance(value, float):
        return code(number(value))
    return code(value)


def envvars(param: click.Parameter) -> list[str]:
    value = param.envvar
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def registry_flag_names() -> set[str]:
    from discovery.cli.options import FLAGS

    return set(FLAGS)


def command_section(name: str, cmd: click.Command, parent: click.Context,
                    borrowed: dict[tuple[str, str], str]) -> list[str]:
    ctx = click.Context(cmd, info_name=name, parent=parent)
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    out = [f"### `discovery {name}`", "", f"`discovery {name} {usage}`", ""]
    if cmd.help:
        out += [inspect.cleandoc(cmd.help), ""]
    rows: list[list[str]] = []
    shared = registry_flag_names()
    collapsed = shared <= {p.name for p in cmd.params}
    for p in cmd.params:
        if isinstance(p, click.Argument):
            rows.append([code(p.make_metavar(ctx)), "—", "required" if p.required else "optional",
                         "argument"])
            continue
        if not isinstance(p, click.Option) or p.hidden:
            continue
        if collapsed and p.name in shared:
            if p.name == next(iter(sorted(shared))):
                from discovery.cli.options import FLAGS

                flags = ", ".join(f"`{FLAGS[n][1]}`" for n in FLAGS)
                rows.append([flags, "see [Registry options](#registry-options)", "—",
                             "TLS and credentials, folded into the registry URL"])
            continue
        env = ", ".join(code(e) for e in envvars(p)) or "—"
        meaning = option_meaning(name, p, borrowed)
        if p.multiple:
            meaning = meaning.rstrip(".") + ("" if "repeatable" in meaning else "; repeatable")
        rows.append([code(flag_spelling(p, ctx)), env, default_spelling(p), meaning])
    return out + table(["flag", "env", "default", "meaning"], rows)


def registry_options_section(all_commands: list[tuple[str, click.Command]]) -> list[str]:
    from discovery.cli.options import FLAGS

    users = [n for n, c in all_commands if registry_flag_names() <= {p.name for p in c.params}]
    example = dict(all_commands)[users[0]] if users else None
    rows = []
    for pname, (_field, flag, spelled, text) in FLAGS.items():
        env = "—"
        if example is not None:
            param = next(p for p in example.params if p.name == pname)
            env = ", ".join(code(e) for e in envvars(param)) or "—"
        rows.append([code(flag), env, code(spelled), text])
    return [
        "### Registry options",
        "",
        "Every command with `--registry` (" + ", ".join(f"`{u}`" for u in users) + ") also "
        "takes these. Flags given on the command line are folded into the URL (a flag that "
        "contradicts the URL is an error); the environment variables are read when the "
        "registry is opened, by the CLI and the Python client alike. There is no password "
        "flag: use `--registry-password-file` or `DISCOVERY_REGISTRY_PASSWORD`.",
        "",
        *table(["flag", "env", "in the URL", "meaning"], rows),
    ]


def global_section() -> list[str]:
    from discovery.cli.app import main

    ctx = click.Context(main, info_name="discovery")
    rows = []
    for p in main.params:
        if isinstance(p, click.Option) and not p.hidden:
            meaning = help_text(p) or (p.name == "version" and "print the version and exit") \
                or undocumented(f"global option {' '.join(p.opts)}")
            env = ", ".join(code(e) for e in envvars(p)) or "—"
            rows.append([code(flag_spelling(p, ctx)), env, default_spelling(p), meaning])
    rows.append(["`-h`, `--help`", "—", "—", "help of `discovery` or of any command"])
    return ["## Global options", "", "Given before the command: "
            "`discovery --log-level debug agent …`.", "",
            *table(["flag", "env", "default", "meaning"], rows)]


# ---- environment index ----------------------------------------------------------------------


def environment_section(all_commands: list[tuple[str, click.Command]]) -> list[str]:
    from discovery.cli.app import main

    used: dict[str, list[str]] = {}
    for p in main.params:
        for e in envvars(p):
            used.setdefault(e, []).append("all (global)")
    for name, cmd in all_commands:
        for p in cmd.params:
            for e in envvars(p):
                used.setdefault(e, []).append(f"`{name}` {p.opts[-1]}")
    rows = [[code(e), ", ".join(where)] for e, where in sorted(used.items())]
    other = [[code(e), text] for e, text in sorted(OTHER_ENV.items())]
    image = [[code(e), text] for e, text in sorted(IMAGE_ENV.items())]
    return [
        "## Environment variables",
        "",
        "Read by the commands as their options (a flag on the command line wins):",
        "",
        *table(["variable", "option"], rows),
        "Read otherwise:",
        "",
        *table(["variable", "meaning"], other),
        "Read only by the container image's entrypoint and health check "
        "([docs/deployment.md](deployment.md)):",
        "",
        *table(["variable", "meaning"], image),
    ]


# ---- the page -------------------------------------------------------------------------------


def render() -> str:
    missing.clear()
    from discovery.cli.app import main

    all_commands = commands()
    borrowed = borrowed_help(all_commands)
    parent = click.Context(main, info_name="discovery")
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_reference.py from the code: do not edit. -->",
        "",
        f"Generated from the code by `{COMMAND}`; do not edit by hand. `--check` (run by "
        "`tests/unit/test_config_reference.py`) fails when this page is out of date.",
        "",
        "Precedence: flags > environment variables > config file > defaults. One TOML file "
        "can hold every table (`[agent]`, `[agent.check]`, `[watcher]`, `[services.NAME]`): "
        "each command reads the tables it needs. Example: "
        "[deploy/discovery.toml](../deploy/discovery.toml).",
        "",
        "* [Global options](#global-options)",
        "* [Commands](#commands): " + ", ".join(
            f"[`{n}`](#discovery-{n})" for n, _ in all_commands),
        "* [The registry URL](#the-registry-url)",
        "* [Config file](#config-file)",
        "* [Container labels](#container-labels)",
        "* [Environment variables](#environment-variables)",
        "",
        *global_section(),
        "## Commands",
        "",
    ]
    for name, cmd in all_commands:
        lines += command_section(name, cmd, parent, borrowed)
    lines += registry_options_section(all_commands)
    lines += registry_url_section()
    lines += ["## Config file", "",
              "The tables below and no others (a misspelled one, say `[agnet]`, is one error "
              "naming it and the known tables).", "",
              *agent_file_section(borrowed), *watcher_file_section()]
    lines += labels_section()
    lines += environment_section(all_commands)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the file is out of date; write nothing")
    parser.add_argument("--output", type=Path, default=OUT, help="default: %(default)s")
    args = parser.parse_args(argv)
    text = render()
    for what in missing:
        print(f"gen_config_reference: {what} has no description", file=sys.stderr)
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(),
                                    str(args.output), "generated", lineterm="", n=1)
        print("\n".join(list(diff)[:60]), file=sys.stderr)
        print(f"{args.output} is out of date: run {COMMAND}", file=sys.stderr)
        return 1
    args.output.write_text(text)
    print(f"wrote {args.output}" + (f" ({len(missing)} undocumented)" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
