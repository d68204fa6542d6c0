"""The sections of docs/configuration.md read from the code's own tables: the registry URL,
the config files (``[agent]``, ``[agent.check]``, ``[watcher]``, ``[services.NAME]``) and the
container labels. ``scripts/gen_config_reference.py`` puts them on the page."""

from __future__ import annotations

import inspect
from typing import Any

from config_cells import code, defaults_of, duration, guard_default, number, table, undocumented
from config_texts import (
    AGENT_CHECK_KEYS,
    CHECK_TYPES,
    LABELS,
    REGISTRATOR_EXTRA,
    SERVICE_KEYS,
    URL_FIELDS,
    URL_PARAMS,
    WATCHER_KEYS,
)

# ---- registry URL ---------------------------------------------------------------------------


def registry_url_section() -> list[str]:
    from discovery.registry import url

    schemes = [[code(f"{s}://"), url.DEFAULT_PORTS[backend], "TLS" if tls else "plain"]
               for s, (backend, tls) in url.SCHEMES.items()]
    params = [[code(f"{p}="), URL_PARAMS.get(p) or undocumented(f"URL parameter {p}")]
              for p in url.QUERY_PARAMS]
    env = [[code(v), URL_FIELDS.get(f) or undocumented(f"registry field {f}")]
           for v, f in url.ENV_VARS.items()]
    return [
        "## The registry URL",
        "",
        "```",
        "SCHEME://[user[:password]@]host[:port][,host[:port]...][/prefix][?param=value&...]",
        "```",
        "",
        f"Default prefix `{url.DEFAULT_PREFIX}`; every instance is stored as JSON under "
        "`<prefix>/services/<service>/<instance-id>`. Details, and how to set up the servers: "
        "[docs/security.md](security.md).",
        "",
        *table(["scheme", "default port", "transport"], schemes),
        *table(["parameter", "meaning"], params),
        "Environment variables fill in what the URL leaves out (the URL always wins):",
        "",
        *table(["variable", "fills"], env),
    ]


# ---- config files ---------------------------------------------------------------------------


def agent_file_section(borrowed: dict[tuple[str, str], str]) -> list[str]:
    from discovery.agent.config import CHECK_KEYS, FILE_KEYS, AgentConfig
    from discovery.agent.spec import CheckSpec
    from discovery.cli.agent import agent

    # the command's own default where it has one (the state dir), else the dataclass's
    defaults = {**defaults_of(AgentConfig),
                **{p.name: p.default for p in agent.params if p.default is not None}}
    agent_help = {name: text for (name, _flags), text in borrowed.items()}
    rows = []
    for key in sorted(FILE_KEYS):
        value = defaults.get(key)
        shown = {"registry": "— (required somewhere)", "node": "the short hostname",
                 "docker": "`DOCKER_HOST` or the local socket", "zone": "none"}.get(key)
        if shown is None:
            shown = code(str(value).lower() if isinstance(value, bool) else
                         number(value) if isinstance(value, float) else value)
        flag = "--" + key.replace("_", "-")
        rows.append([code(key), code(flag), shown,
                     agent_help.get(key) or undocumented(f"[agent] key {key}")])
    check_defaults = defaults_of(CheckSpec)
    check_rows = []
    for key in sorted(CHECK_KEYS):
        value = check_defaults.get(key)
        shown = code(number(value) if isinstance(value, float) else value)
        check_rows.append([code(key), shown,
                           AGENT_CHECK_KEYS.get(key) or undocumented(f"[agent.check] key {key}")])
    return [
        "### `[agent]`",
        "",
        "Read by `discovery agent --config` and `discovery up --config`, both re-reading it on "
        "SIGHUP (a changed `node` is refused with a warning: restart to rename a node). Flags "
        "and environment variables win over the file; `up` uses the file's `registry` when "
        "neither `--registry` nor `DISCOVERY_REGISTRY` is given. Each key's value must be of "
        "its type (`ttl`, `resync`: numbers; `internal`: true or false; the rest strings): "
        "one error names the key otherwise.",
        "",
        *table(["key", "flag", "default", "meaning"], rows),
        "### `[agent.check]`",
        "",
        "Check defaults for every container; its labels override them "
        "([Container labels](#container-labels)). Durations are seconds (a number) or a "
        "string such as `\"500ms\"` or `\"2s\"`.",
        "",
        *table(["key", "default", "meaning"], check_rows),
    ]


def watcher_file_section() -> list[str]:
    from discovery.watcher import config as wc
    from discovery.watcher import slots

    defaults = defaults_of(wc.WatcherConfig)
    timeouts = ", ".join(f"{k} {duration(ms / 1000)}" for k, ms in wc.DEFAULT_TIMEOUTS.items())
    shown = {
        "maxconn": code(defaults["maxconn"]),
        "timeouts": timeouts,
        "stats_port": "off",
        "wait": code(f"{duration(defaults['wait_min'])}:{duration(defaults['wait_max'])}"),
        "reload_min_interval": code(duration(defaults["reload_min_interval"])),
        "template": "the built-in one",
        "wipe_guard": "on: " + code(guard_default(defaults["guard"])),
    }
    rows = [[code(k), shown.get(k, "—"), WATCHER_KEYS.get(k) or undocumented(f"[watcher] {k}")]
            for k in sorted(wc._WATCHER_KEYS)]
    sdefaults = defaults_of(wc.ServiceConfig)
    minimum = inspect.signature(slots.slot_count).parameters["minimum"].default
    choices = {"mode": wc.MODES, "balance": wc.BALANCE}
    srows = []
    for key in sorted(wc._SERVICE_KEYS):
        if key == "port":
            value = "required"
        elif key == "slots":
            value = f"{minimum}, grown as needed"
        elif key in choices:
            value = code(sdefaults[key]) + ": " + " | ".join(code(c) for c in choices[key])
        else:
            raw = sdefaults.get(key)
            value = {True: "`true`", False: "`false`"}.get(raw, "—") if isinstance(raw, bool) \
                else "—" if raw in (None, (), {}) else code(raw)
        srows.append([code(key), value,
                      SERVICE_KEYS.get(key) or undocumented(f"[services.NAME] {key}")])

    def keywords(table_: dict[str, Any]) -> str:
        return ", ".join(code(k) for k in sorted(table_))

    return [
        "### `[watcher]`",
        "",
        "Read by `discovery watch --config` (re-read on SIGHUP), `discovery up --config` and "
        "`discovery check-config --config`. Durations are strings (`\"500ms\"`, `\"1s\"`) or "
        "numbers; an unknown key is an error naming it.",
        "",
        *table(["key", "default", "meaning"], rows),
        "### `[services.NAME]`",
        "",
        "One table per routed service: HAProxy listens on `bind:port` and balances over the "
        "healthy instances of the registry service `NAME` (the backend is named `NAME`). "
        "`--service NAME[:BIND]:PORT` adds one or overrides the port (and bind) of one.",
        "",
        *table(["key", "default", "meaning"], srows),
        f"* Timeout names: frontend {keywords(dict.fromkeys(wc.FRONTEND_TIMEOUTS))}; "
        f"backend {keywords(dict.fromkeys(wc.BACKEND_TIMEOUTS))}. `[watcher] timeouts` takes "
        "all of them.",
        f"* `server_options` keywords: {keywords(dict(wc.SERVER_KEYWORDS))}.",
        f"* `check_options` keywords: {keywords(dict(wc.CHECK_KEYWORDS))}.",
        f"* At most {wc.MAX_OPTION_WORDS} words in `server_options` and `check_options` "
        "together; every value is checked against the keyword's pattern.",
        "",
    ]


# ---- labels ---------------------------------------------------------------------------------


def labels_section() -> list[str]:
    from discovery.agent import labels
    from discovery.agent.checks import BUILTIN_CHECKS
    from discovery.agent.spec import CheckSpec

    check = defaults_of(CheckSpec)
    fill = {"check": check["type"], "interval": duration(check["interval"]),
            "timeout": duration(check["timeout"]), "rise": check["rise"], "fall": check["fall"]}
    rows = [[code(label), default.format(**fill), meaning] for label, default, meaning, _ in LABELS]
    documented = {label.split(".")[1] for label, *_ in LABELS}
    for name in sorted(({*labels._PLAIN, "port", "meta", "check"}) - documented):
        rows.append([code(labels.PREFIX + name), "—", undocumented(f"label {name}")])
    types = [[code(t), CHECK_TYPES.get(t) or undocumented(f"check type {t}")]
             for t in sorted(BUILTIN_CHECKS)]
    reg_rows = [[code(f"SERVICE_{field}"), f"`{labels.PREFIX}{canon}`"]
                for field, canon in labels._REGISTRATOR_FIELDS.items()]
    reg_rows += [[code(f"SERVICE_PORT_{field}"), f"`{labels.PREFIX}PORT.{canon}`"]
                 for field, canon in labels._REGISTRATOR_FIELDS.items()]
    reg_rows += [[code(a), b] for a, b in REGISTRATOR_EXTRA]
    return [
        "## Container labels",
        "",
        "Read by the agent from each container's labels (this table is maintained in "
        "`scripts/config_texts.py`; `tests/unit/test_config_reference.py` parses every "
        "example through `discovery.agent.labels`). A label that cannot be used skips that "
        "container with one log line naming it and the label.",
        "",
        *table(["label", "default", "meaning"], rows),
        "Built-in check types (plugins add more: [docs/checks.md](checks.md)):",
        "",
        *table(["`discovery.check=`", "healthy when"], types),
        "### registrator's names",
        "",
        "Also read, as labels **or** environment variables of the container; when both "
        "spellings are given, `discovery.*` labels win over `SERVICE_*` labels, which win over "
        "`SERVICE_*` environment variables ([docs/migration.md](migration.md)).",
        "",
        *table(["registrator", "same as"], reg_rows),
    ]
