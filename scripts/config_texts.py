"""The meanings ``scripts/gen_config_reference.py`` writes into docs/configuration.md that the
code does not carry: options without a help text, config file keys, check types, registry
URL parameters and fields, the label table, registrator's names and the environment the
container image reads. A key the code has and these tables lack is written as
``UNDOCUMENTED`` and fails ``tests/unit/test_config_reference.py``."""

from __future__ import annotations

#: options without a help text: "command:param" first, then "param" for every command
OPTION_HELP = {
    "fmt": "output format",
}

AGENT_CHECK_KEYS = {
    "type": "check type (a known type or plugin) for containers whose labels name none (a "
            "container whose image has a HEALTHCHECK follows it instead)",
    "interval": "seconds between check runs",
    "timeout": "seconds one run may take",
    "rise": "passing runs in a row to register (1..100)",
    "fall": "failing runs in a row to deregister (1..100)",
}

WATCHER_KEYS = {
    "maxconn": "HAProxy global `maxconn`",
    "timeouts": "`defaults` timeouts, a table: `{ connect = \"5s\", client = \"1m\" }` "
                "(bare numbers are milliseconds)",
    "stats_port": "HAProxy stats page on `127.0.0.1:PORT`",
    "wait": "quiescence window `MIN[:MAX]`: a burst of changes is applied once quiet for MIN, "
            "never later than MAX after the first (MIN alone: MAX = 4 x MIN); `--wait` wins",
    "reload_min_interval": "at most one HAProxy reload per this interval",
    "template": "your Jinja2 template for haproxy.cfg ([templates/README.md]"
                "(../templates/README.md)); `--template` wins",
    "wipe_guard": "a registry wipe (a burst of removals, each within `window` of the one "
                  "before, reaching at least `min_removed` instances and `fraction` of the "
                  "catalog, or leaving at least `min_removed` services and `fraction` of "
                  "them, on more than one node, with none serving: up and of weight above "
                  "0) is held for up to `hold` (up to twice `hold` while held instances "
                  "still come back) instead of emptying services; the last instance of a "
                  "service goes after `settle` (while removals of several nodes keep coming "
                  "less than `window` apart, once they pause, 30 s at most). "
                  "A table `{ settle, window, fraction, min_removed, hold }` or `false` "
                  "([operations.md](operations.md#the-wipe-guard))",
    "zone": "this watcher's zone (a DNS label; `--zone` wins): each service is routed to the "
            "instances of this zone, and to every zone while it has fewer than `zone_min_up` "
            "up instances that take traffic (weight above 0) "
            "([traffic.md](traffic.md#zone-aware-routing))",
}

SERVICE_KEYS = {
    "port": "local port to listen on (**required**); `--service NAME:PORT` overrides it",
    "bind": "listen address (an IP)",
    "mode": "HAProxy mode",
    "balance": "balance algorithm (`source` and `uri` get `hash-type consistent`)",
    "server_options": "extra keywords for every `server` line: whitelisted server keywords "
                      "only (below)",
    "check": "HAProxy-side checks too (the agent already checks before registering)",
    "check_options": "check keywords (below); needs `check = true`",
    "httpchk": "path for `option httpchk GET <path>`; needs `check = true`",
    "timeouts": "per-service timeouts, a table (frontend and backend names below)",
    "tags": "route only instances having all these tags",
    "slots": "minimum pre-allocated server slots (more are added, by a reload, when needed)",
    "maxconn": "frontend `maxconn`",
    "outlier": "outlier ejection: `{ consecutive_errors = 5, interval = \"1s\", base_ejection "
               "= \"10s\", max_ejected = \"50%\" }` (those are the defaults; every key "
               "optional; `true`: all defaults; not set: off, but on with the defaults in an "
               "HTTP service routed by `[watcher] zone` without `check`; `false`: off). An "
               "instance failing `consecutive_errors` "
               "requests in a row is drained for `base_ejection` x its ejections "
               "([traffic.md](traffic.md#outlier-ejection))",
    "zone_min_up": "with `[watcher] zone`: spill over to other zones while the local zone has "
                   "fewer up instances of weight above 0 than this",
}

CHECK_TYPES = {
    "tcp": "a TCP connection to the advertised address and port succeeds",
    "http": "`GET http://ADDRESS:PORT<path>` answers the expected status",
    "exec": "`command` exits 0 **inside the container** (Docker exec, no shell)",
    "docker": "the image's own HEALTHCHECK says `healthy` (follows Docker's events); needs a "
              "HEALTHCHECK",
    "none": "always healthy",
}

#: the registry URL's query parameters and environment variables
URL_PARAMS = {
    "ca": "CA certificate(s), PEM, to verify the servers with; implies TLS",
    "cert": "client certificate, PEM (with `key=`); implies TLS",
    "key": "private key of `cert=`, PEM; implies TLS",
    "password_file": "file holding the password (trailing newlines ignored)",
    "format": "`zk://` only: `nerve` reads and writes Airbnb Nerve's ZooKeeper nodes "
              "(service S under `<prefix>/S`; [migration.md](migration.md#joining-a-nerve-fleet"
              "-host-by-host)); default: discovery's own layout",
    "path": "with `format=nerve`: where service S's nodes are, `{service}` standing for S, "
            "e.g. `/nerve/services/{service}/services` (Airbnb's layout); the prefix is then "
            "unused",
    "spread": "seconds (0 to 60, default 3) over which this host spreads its resume after it lost "
              "the registry: watch reconnects, ZooKeeper reconnects (within a third of the "
              "session timeout at most; a `spread=` over that, up to 0.6 of it, is the period "
              "a host waits between attempts while the whole ensemble is down, `spread=6` at "
              "a 10 s TTL for a fleet: [operations.md](operations.md#a-full-registry-restart)), "
              "lease renewal retries "
              "(the agent's reconcile after it comes within one `--resync` period) "
              "([operations.md](operations.md#a-full-registry-restart)); and the write-back "
              "of this host's own instances, seen deleted by another writer "
              "([operations.md](operations.md#an-entry-deleted-by-hand)), whose watches of the "
              "host's own keys resume 3 to 20 spreads after a lost link",
    "own": "how this host follows its own entries that no watch of it follows (`discovery "
           "agent` alone, or a router's own instances of services it does not route), so that "
           "one deleted or changed by another writer is written back within `spread=`: `keys` "
           "(default) watches each key alone (etcd: one watcher a key, on the members); "
           "`services` (`etcd://` only) watches their services instead, as a router of them "
           "does: use it behind `etcd grpc-proxy`, which serves those watches to every host "
           "from one watcher a service, where it cannot share one a key "
           "([operations.md](operations.md#a-fan-out-tier-etcds-grpc-proxy)); `off`: none, "
           "such an entry comes back at the agent's next reconcile (`--resync`)",
}
URL_FIELDS = {
    "user": "the user (etcd user / ZooKeeper digest user)",
    "password": "the password itself (there is deliberately no flag for it)",
    "password_file": "`password_file=`",
    "tls_ca": "`ca=`",
    "tls_cert": "`cert=`",
    "tls_key": "`key=`",
}

#: (label, default, meaning, example labels that parse, as label -> value)
LABELS: list[tuple[str, str, str, dict[str, str]]] = [
    ("discovery.service", "—", "service name, a lowercase DNS label. **Only containers with "
     "this label (or `SERVICE_NAME`) are registered**", {"discovery.service": "web"}),
    ("discovery.port", "the only exposed TCP port",
     "container port to register; needed when the container exposes several",
     {"discovery.port": "8080"}),
    ("discovery.tags", "none", "comma-separated tags, each a DNS label",
     {"discovery.tags": "blue,v2"}),
    ("discovery.weight", "`100`", "0..256; 0 takes no new connections",
     {"discovery.weight": "50"}),
    ("discovery.zone", "the agent's `--zone`", "this container's zone, a DNS label (written "
     "into the record as `zone`)", {"discovery.zone": "eu-1a"}),
    ("discovery.meta.KEY", "—", "free-form metadata `KEY=VALUE` (printable, up to 512 chars)",
     {"discovery.meta.version": "1.4"}),
    ("discovery.ignore", "`false`", "`true`: never register this container",
     {"discovery.ignore": "false"}),
    ("discovery.PORT.service", "—", "per-port service name, for a container offering several; "
     "`discovery.PORT.tags`, `.weight`, `.ignore`, `.meta.KEY`, `.check*` likewise override "
     "the container-wide labels for that port", {"discovery.8080.service": "web",
                                                 "discovery.8080.tags": "blue"}),
    ("discovery.check", "`docker` if the image has a HEALTHCHECK, else `{check}`",
     "check type: a built-in (below) or a plugin's name ([docs/checks.md](checks.md))",
     {"discovery.check": "tcp"}),
    ("discovery.check.interval", "`{interval}`", "time between runs (`500ms`, `2s`; "
     "50ms..60s; `exec` checks at least 1s)", {"discovery.check.interval": "500ms"}),
    ("discovery.check.timeout", "`{timeout}`", "how long one run may take (at most the interval)",
     {"discovery.check.timeout": "2s"}),
    ("discovery.check.rise", "`{rise}`", "passing runs in a row to register (1..100)",
     {"discovery.check.rise": "3"}),
    ("discovery.check.fall", "`{fall}`", "failing runs in a row to deregister (1..100)",
     {"discovery.check.fall": "3"}),
    ("discovery.check.path", "`/`", "`http`: path to GET (printable ASCII, no spaces)",
     {"discovery.check": "http", "discovery.check.path": "/health"}),
    ("discovery.check.status", "any 2xx or 3xx", "`http`: expected status: `200`, `2xx`, "
     "`200,3xx`", {"discovery.check": "http", "discovery.check.status": "2xx"}),
    ("discovery.check.command", "—", "`exec`: the command, a JSON array or shell-like words "
     "(never run by a shell)",
     {"discovery.check": "exec", "discovery.check.command": '["test", "-f", "/tmp/ok"]'}),
    ("discovery.check.PARAM", "—", "any other parameter, handed to plugin checks",
     {"discovery.check.contains": "ok"}),
    ("discovery.warmup.requests", "`0` (off)", "warm-up requests (1..10000): once the checks "
     "first pass after the container starts, the agent sends this many `GET`s to the "
     "instance's address and port and only then registers it (HTTP, whatever the check type; "
     "any status counts; [traffic.md](traffic.md#warm-up-requests))",
     {"discovery.warmup.requests": "200"}),
    ("discovery.warmup.path", "`/`", "path the warm-up requests `GET` (printable ASCII, "
     "starts with `/`, up to 256 chars)",
     {"discovery.warmup.requests": "50", "discovery.warmup.path": "/_ah/warmup"}),
    ("discovery.warmup.concurrency", "`2`", "warm-up requests in flight at once (1..16)",
     {"discovery.warmup.requests": "50", "discovery.warmup.concurrency": "4"}),
    ("discovery.warmup.timeout", "`30s`", "budget of the whole warm-up (100ms..5m; each request "
     "at most 5s); when it runs out the instance is registered anyway, with a warning",
     {"discovery.warmup.requests": "50", "discovery.warmup.timeout": "1m"}),
]
#: registrator spellings the code reads but that have no discovery.* twin in _REGISTRATOR_FIELDS
REGISTRATOR_EXTRA = [
    ("SERVICE_KEY=value", "`discovery.meta.key=value` (the key lower-cased)"),
    ("SERVICE_PORT_KEY=value", "`discovery.PORT.meta.key=value`"),
    ("SERVICE_ID, SERVICE_CHECK_*", "ignored: our ids are `<node>:<container>:<port>`; "
     "checks are `discovery.check*`"),
]

#: variables read only by the container image (deploy/entrypoint.sh, deploy/healthcheck.py)
IMAGE_ENV = {
    "DISCOVERY_CONFIG": "`agent`, `watch`, `up`: the TOML file; default "
                        "`/etc/discovery/discovery.toml` when it is mounted (for `watch` it "
                        "becomes `DISCOVERY_WATCH_CONFIG`, for `up` `--config`)",
    "DISCOVERY_SERVICES": "`up`, `watch`: `\"web:18000 api:127.0.0.1:18001\"`, one `--service` "
                          "each",
    "DISCOVERY_HTTP": "`agent` (as `DISCOVERY_AGENT_HTTP`), `watch`: `--http`; `off` disables",
    "DISCOVERY_DNS": "`watch`: `--dns`; `off` disables",
    "DISCOVERY_HEALTH_URL": "the image's HEALTHCHECK: the `/v1/health` URL to ask (default: "
                            "from the command's `--http`)",
    "DISCOVERY_RUN_AS_ROOT": "`1`: keep root instead of switching to user `discovery`",
}
#: variables read by libraries or by the CLI itself, not through click options
OTHER_ENV = {
    "DISCOVERY_REGISTRY_PASSWORD": "the registry password (see the registry URL above)",
    "DOCKER_HOST": "`agent`, `up`: dockerd to follow when `--docker` is not given",
    "MALLOC_ARENA_MAX": "`agent`, `watch`, `dns`, `up` (glibc): the most malloc arenas; "
                        "unset, these commands use 2 (glibc: 8 a core), which keeps `up` ~5 MB "
                        "smaller ([benchmarks.md]"
                        "(benchmarks.md#per-host-footprint-benchfootprintpy))",
    "_DISCOVERY_COMPLETE": "shell completion: `eval \"$(_DISCOVERY_COMPLETE=bash_source "
                           "discovery)\"` (`zsh_source`, `fish_source`)",
}
