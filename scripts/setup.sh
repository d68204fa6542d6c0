#!/usr/bin/env bash
# Everything `make test` / `make demo` need on a fresh Debian machine, idempotent:
# Debian packages, the .venv with the project and its test extras, and a running dockerd.
set -euo pipefail
cd "$(dirname "$0")/.."

# prometheus and dnsmasq-base: real clients the interop tests start (http_sd/nerve_sd, forwarding)
PKGS=(docker.io etcd-server etcd-client zookeeper haproxy busybox-static socat dnsutils debootstrap docker-compose
      prometheus dnsmasq-base chromium chromium-driver)  # chromium: the status page's browser test
if [ "${DISCOVERY_BENCH:-}" = 1 ]; then
  PKGS+=(wrk hey dnsperf gcc libc6-dev)  # load generators; gcc: bench/srcaddr.c (fleet.py)
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.discovery-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing the project and its test and bench extras into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[test,bench]' 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import discovery, pyetcd, kazoo, docker, consul, gevent" 
  touch "$stamp"
fi

if ! docker info >/dev/null 2>&1; then
  echo "setup: starting dockerd"
  mkdir -p /var/log
  setsid nohup dockerd --bridge=none --iptables=false --ip-masq=false >/var/log/discovery-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not come up; see /var/log/discovery-dockerd.log" >&2; exit 1; }
fi
echo "setup: ready"
