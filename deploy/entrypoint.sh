#!/bin/sh
# Entrypoint of the discovery image: PID 1, it execs (as the user it ends up as) tini, which
# stays PID 1 and runs discovery (or the program asked for).
#
# 1. Started as root (`--user 0`)? Drop to the user `discovery`, adding the group that owns the
#    Docker socket, so no `--group-add` is needed. DISCOVERY_RUN_AS_ROOT=1 keeps root (only for
#    hosts where nothing but root may use the socket).
# 2. `agent` / `up` need the Docker socket: fail at once, with the fix, when it is missing or
#    not usable by this user (instead of retrying forever).
# 3. Settings from the environment that some commands only take as flags:
#      DISCOVERY_CONFIG    TOML file; default /etc/discovery/discovery.toml when mounted
#      DISCOVERY_SERVICES  "web:18000 api:127.0.0.1:18001" -> --service web:18000 --service ...
#      DISCOVERY_HTTP      HTTP API (/v1/health, /metrics) address, e.g. 127.0.0.1:8500 or off
#      DISCOVERY_DNS       DNS address, e.g. 127.0.0.1:8600 or off
#    A flag given on the command line always wins.
# 4. exec discovery "$@" (`docker run IMAGE services`, `... agent`, `... watch` all work); a
#    first argument that is not a discovery command but a program (sh, haproxy) runs that.
set -euf  # -f: no globbing, words are split on purpose below

DEFAULT_CONFIG=/etc/discovery/discovery.toml

[ $# -gt 0 ] || set -- up
case "$1" in
  up|agent|watch|services|dns|-*) ;;
  *) if command -v "$1" >/dev/null 2>&1; then exec /usr/bin/tini -- "$@"; fi ;;
esac

# The subcommand: the first argument that is not a global option (--log-level X).
cmd=""
skip=0
for a in "$@"; do
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  case "$a" in
    --log-level) skip=1 ;;
    -*) ;;
    *) cmd=$a; break ;;
  esac
done

has_flag() {  # has_flag --http "$@": is --http or --http=... among the arguments?
  f=$1; shift
  for a in "$@"; do
    case "$a" in "$f"|"$f"=*) return 0 ;; esac
  done
  return 1
}

docker_socket() {  # the local socket path the agent will use, or nothing (tcp:// etc.)
  url=${DISCOVERY_DOCKER:-${DOCKER_HOST:-unix:///var/run/docker.sock}}
  case "$url" in
    unix://*) printf '%s\n' "${url#unix://}" ;;
    /*) printf '%s\n' "$url" ;;
  esac
}

sock=""
case "$cmd" in
  up|agent) has_flag --docker "$@" || sock=$(docker_socket) ;;
esac

if [ "$(id -u)" = 0 ] && [ -z "${DISCOVERY_RUN_AS_ROOT:-}" ] && id discovery >/dev/null 2>&1; then
  groups=$(id -g discovery)
  if [ -n "$sock" ] && [ -S "$sock" ]; then groups="$groups,$(stat -c %g "$sock")"; fi
  HOME=/var/lib/discovery USER=discovery LOGNAME=discovery
  export HOME USER LOGNAME
  exec setpriv --reuid=discovery --regid=discovery --groups="$groups" -- "$0" "$@"
fi

if [ -n "$sock" ]; then
  if [ ! -S "$sock" ]; then
    echo "discovery: no Docker socket at $sock; mount it:" \
         "-v /var/run/docker.sock:$sock:ro (or set DOCKER_HOST / --docker)" >&2
    exit 78
  fi
  if [ ! -r "$sock" ] || [ ! -w "$sock" ]; then
    gid=$(stat -c %g "$sock")
    echo "discovery: user $(id -un 2>/dev/null || id -u) (groups $(id -G)) cannot use $sock" \
         "(owner $(stat -c %u "$sock"):$gid, mode $(stat -c %a "$sock")); run the container" \
         "with --group-add $gid (compose: group_add: [\"$gid\"]), or start it as root" \
         "(--user 0): it then drops to user discovery with that group" >&2
    exit 77
  fi
fi

# Settings from the environment, only where no flag says otherwise.
if [ -z "${DISCOVERY_CONFIG:-}" ] && [ -f "$DEFAULT_CONFIG" ]; then
  DISCOVERY_CONFIG=$DEFAULT_CONFIG
fi
extra=""
add() { extra="$extra $1"; }  # words without spaces only: flag names and checked values
case "$cmd" in
  agent)
    # The agent reads DISCOVERY_CONFIG and DISCOVERY_AGENT_HTTP itself.
    if [ -n "${DISCOVERY_CONFIG:-}" ]; then export DISCOVERY_CONFIG; fi
    if [ -z "${DISCOVERY_AGENT_HTTP:-}" ] && [ -n "${DISCOVERY_HTTP:-}" ] \
        && [ "$DISCOVERY_HTTP" != off ]; then
      DISCOVERY_AGENT_HTTP=$DISCOVERY_HTTP
      export DISCOVERY_AGENT_HTTP
    fi
    ;;
  up|watch)
    if [ "$cmd" = watch ] && [ -z "${DISCOVERY_WATCH_CONFIG:-}" ] \
        && [ -n "${DISCOVERY_CONFIG:-}" ]; then
      DISCOVERY_WATCH_CONFIG=$DISCOVERY_CONFIG
      export DISCOVERY_WATCH_CONFIG
    fi
    if [ "$cmd" = up ] && [ -n "${DISCOVERY_CONFIG:-}" ] && ! has_flag --config "$@"; then
      add "--config=$DISCOVERY_CONFIG"
    fi
    if [ -n "${DISCOVERY_HTTP:-}" ] && ! has_flag --http "$@"; then
      if [ "$cmd" = up ] || [ "$DISCOVERY_HTTP" != off ]; then add "--http=$DISCOVERY_HTTP"; fi
    fi
    if [ -n "${DISCOVERY_DNS:-}" ] && ! has_flag --dns "$@"; then
      if [ "$cmd" = up ] || [ "$DISCOVERY_DNS" != off ]; then add "--dns=$DISCOVERY_DNS"; fi
    fi
    if [ -n "${DISCOVERY_SERVICES:-}" ]; then
      for s in $(printf '%s' "$DISCOVERY_SERVICES" | tr ',' ' '); do add "--service=$s"; done
    fi
    ;;
esac
for w in $extra; do
  case "$w" in
    *[!A-Za-z0-9_./:=@-]*) echo "discovery: bad value in the environment: $w" >&2; exit 78 ;;
  esac
done

# shellcheck disable=SC2086  # $extra: checked words, split on purpose
exec /usr/bin/tini -- discovery "$@" $extra
