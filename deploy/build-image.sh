#!/usr/bin/env bash
# Build the discovery sidecar image with no image registry and no network inside the build:
#   1. the base: deploy/build-base.sh (debootstrap bookworm -> docker import; cached by tag)
#   2. wheels of the project and every dependency, prepared on the host into deploy/wheels/
#      (offline from what is already there when possible, else from the package index)
#   3. docker build --network none, FROM that base, `pip install --no-index` of those wheels
# Prints the image tag as the last line of stdout.
#
# Usage: deploy/build-image.sh [-t TAG] [--base TAG] [--pull-wheels]
#   -t TAG          image tag (default discovery:latest)
#   --base TAG      use this base image instead of building/reusing discovery-base
#   --pull-wheels   refresh deploy/wheels from the package index (newest allowed versions)
# Env: PYTHON (default .venv/bin/python, else python3): the host Python that builds the
#      wheels; it must be CPython 3.11 on x86_64 like bookworm's, for the binary wheels to fit.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=discovery:latest
base=""
refresh=0
while [ $# -gt 0 ]; do
  case "$1" in
    -t|--tag) tag=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --pull-wheels) refresh=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
abi=$("$PY" -c 'import platform, sys; print(f"{sys.implementation.name}{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')
if [ "$abi" != "cpython311-x86_64" ]; then
  echo "build-image: $PY is $abi; the image's Python is CPython 3.11 on x86_64 (set PYTHON=)" >&2
  exit 1
fi

t0=$(date +%s)
if [ -z "$base" ]; then
  base=$(deploy/build-base.sh | tail -n 1)
fi
t1=$(date +%s)

# Wheels. setuptools is there too so that building the project's own wheel (PEP 517 build
# isolation) also works with --no-index. SOURCE_DATE_EPOCH makes the project's wheel
# byte-identical for identical sources, so Docker's layer cache holds when nothing changed.
wheels=deploy/wheels
mkdir -p "$wheels"
# One build at a time per work tree (the wheels folder is the build context's input).
exec 8>"$wheels/.lock"
flock 8
rm -f "$wheels"/discovery-*.whl
log=$(mktemp)
trap 'rm -f "$log"' EXIT
pipw() {
  SOURCE_DATE_EPOCH=315532800 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PY" -m pip wheel --quiet --wheel-dir "$wheels" --find-links "$wheels" "$@" . "setuptools>=64" >>"$log" 2>&1
}
if [ "$refresh" = 1 ] || ! pipw --no-index; then
  echo "build-image: fetching wheels from the package index" >&2
  pipw || { cat "$log" >&2; echo "build-image: pip wheel failed" >&2; exit 1; }
fi
t2=$(date +%s)

docker build --network none --build-arg "BASE=$base" -t "$tag" . >"$log" 2>&1 \
  || { cat "$log" >&2; echo "build-image: docker build failed" >&2; exit 1; }
t3=$(date +%s)
echo "build-image: $tag FROM $base: base $((t1 - t0))s, wheels $((t2 - t1))s, build $((t3 - t2))s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
echo "$tag"
