#!/usr/bin/env bash
# Build the sidecar's base image from Debian's own packages: no image registry needed.
#
#   debootstrap --variant=minbase bookworm (+ python3, python3-venv, haproxy, tini,
#   ca-certificates) -> trimmed -> `tar | docker import` -> discovery-base:bookworm-<hash>
#
# Cached by tag: <hash> is a sha256 of this script's code (comments left out; the code holds
# the suite, the package list and every trimming step), so the slow part (one debootstrap,
# about a minute) runs once per machine and again only when the code changes. Older
# discovery-base:bookworm-* tags are then removed (their layers stay while images use them).
# The image is also tagged discovery-base:bookworm, the Dockerfile's default BASE.
# Prints the hashed tag as the last line of stdout.
#
# Usage: deploy/build-base.sh [--force] [--print-tag]
#   --force       rebuild even when the tag exists (e.g. to pick up Debian security updates)
#   --print-tag   print the tag this script would build and exit (no root, no docker needed)
# Env: DISCOVERY_BASE_MIRROR (default http://deb.debian.org/debian), TMPDIR.
# Needs: root (or sudo), debootstrap, docker. Concurrent runs wait on a lock.
set -euo pipefail

SUITE=bookworm
PACKAGES=(python3 python3-venv haproxy tini ca-certificates)
REPO=discovery-base
MIRROR=${DISCOVERY_BASE_MIRROR:-http://deb.debian.org/debian}

self=$(readlink -f "${BASH_SOURCE[0]}")
hash=$(grep -v '^[[:space:]]*#' "$self" | sha256sum | cut -c1-12)
TAG="$REPO:$SUITE-$hash"

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --print-tag) echo "$TAG"; exit 0 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$self"; exit 0 ;;
    *) echo "build-base: unknown argument $arg" >&2; exit 2 ;;
  esac
done

have_tag() { docker image inspect "$1" >/dev/null 2>&1; }

if [ "$force" = 0 ] && have_tag "$TAG"; then
  docker tag "$TAG" "$REPO:$SUITE"
  echo "build-base: $TAG exists (cached)" >&2
  echo "$TAG"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
command -v debootstrap >/dev/null || { echo "build-base: debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }

# One build at a time per machine; a second caller waits, then finds the tag.
lock="${TMPDIR:-/tmp}/discovery-base-$SUITE.lock"
exec 9>"$lock"
flock 9
if [ "$force" = 0 ] && have_tag "$TAG"; then
  docker tag "$TAG" "$REPO:$SUITE"
  echo "$TAG"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/discovery-base.XXXXXX")
root="$work/rootfs"
cleanup() {
  # debootstrap mounts /proc and /sys inside the target: unmount before removing anything.
  if [ -d "$root" ]; then
    awk -v r="$root" 'index($2, r) == 1 { print $2 }' /proc/self/mounts | sort -r |
      while read -r m; do $SUDO umount -l "$m" 2>/dev/null || true; done
  fi
  $SUDO rm -rf --one-file-system "$work"
}
trap cleanup EXIT

include=$(IFS=,; echo "${PACKAGES[*]}")
start=$(date +%s)
echo "build-base: debootstrap --variant=minbase --include=$include $SUITE ($MIRROR)" >&2
if ! $SUDO debootstrap --variant=minbase --include="$include" "$SUITE" "$root" "$MIRROR" \
    >"$work/debootstrap.log" 2>&1; then
  tail -n 40 "$work/debootstrap.log" >&2
  tail -n 40 "$root/debootstrap/debootstrap.log" >&2 2>/dev/null || true
  echo "build-base: debootstrap failed" >&2
  exit 1
fi

# Trim: package caches and lists, docs, man pages, locales, logs. dpkg and apt stay, so an
# image FROM this one can still `apt-get install` (after an `apt-get update`).
$SUDO sh -c "
  set -e
  cd '$root'
  rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* \
         var/cache/debconf/*-old var/lib/dpkg/*-old var/log/* \
         usr/share/doc/* usr/share/man/* usr/share/info/* usr/share/lintian \
         usr/share/locale/* usr/share/zoneinfo/right usr/share/zoneinfo/posix
  # Docker provides these at run time.
  rm -f etc/hostname etc/resolv.conf
  : > etc/machine-id
  # No daemons start in the image (haproxy is run by the watcher, never by init scripts).
  printf '#!/bin/sh\nexit 101\n' > usr/sbin/policy-rc.d && chmod 755 usr/sbin/policy-rc.d
  printf 'deb %s %s main\n' '$MIRROR' '$SUITE' > etc/apt/sources.list
"

$SUDO tar --numeric-owner --xattrs -C "$root" -c . |
  docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.opencontainers.image.title=discovery-base org.opencontainers.image.base.name=debian:$SUITE discovery-base.hash=$hash" \
    --message "debootstrap --variant=minbase --include=$include $SUITE" \
    - "$TAG" >/dev/null
docker tag "$TAG" "$REPO:$SUITE"
for old in $(docker image ls --format '{{.Repository}}:{{.Tag}}' "$REPO"); do
  case "$old" in
    "$TAG"|"$REPO:$SUITE") ;;
    "$REPO:$SUITE-"*) docker rmi "$old" >/dev/null 2>&1 || true ;;
  esac
done
echo "build-base: built $TAG in $(( $(date +%s) - start ))s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
echo "$TAG"
