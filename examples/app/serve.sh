#!/bin/sh
# Tiny HTTP app: busybox httpd on 127.0.0.1:$PORT (meant for --network host).
#   GET /        -> "$NAME\n"  (index.html; tells instances apart)
#   GET /health  -> "ok\n", or 404 when HEALTHY=0
# Flip health at runtime:  docker exec C rm -f /tmp/www/health               (unhealthy)
#                          docker exec C sh -c 'echo ok > /tmp/www/health'   (healthy)
set -eu
: "${PORT:?PORT must be set}"
NAME="${NAME:-$(hostname)}"
WWW=/tmp/www
mkdir -p "$WWW"
printf '%s\n' "$NAME" > "$WWW/index.html"
if [ "${HEALTHY:-1}" = "0" ]; then
  rm -f "$WWW/health"
else
  printf 'ok\n' > "$WWW/health"
fi
echo "serve.sh: $NAME listening on 127.0.0.1:$PORT (healthy=${HEALTHY:-1})"
# This shell is PID 1: without a trap it would ignore SIGTERM and `docker stop` (and a
# dockerd shutdown) would wait for the 10 s SIGKILL timeout. TERM/INT are forwarded to httpd;
# INT at once.
httpd -f -v -p "127.0.0.1:$PORT" -h "$WWW" &
child=$!
# Graceful stop, as a real service should do it: keep serving for DRAIN_SECONDS after SIGTERM
# (discovery drains the instance on Docker's kill event, within ~100 ms), then stop.
trap 'sleep "${DRAIN_SECONDS:-1}"; kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' TERM
trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' INT
set +e
wait "$child"
exit $?
