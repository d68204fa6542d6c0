# The discovery sidecar: agent + watcher + HAProxy (+ DNS and HTTP lookups) in one image.
#
# No image registry is needed: the base is made locally from Debian's packages and the Python
# wheels are prepared on the host, so nothing is downloaded while this builds.
#
#   deploy/build-image.sh            # = the three steps below
#   deploy/build-base.sh             # debootstrap bookworm -> discovery-base:bookworm (cached)
#   pip wheel . setuptools -w deploy/wheels
#   docker build --network none -t discovery:latest .
#
# Run (see docs/deployment.md):
#   docker run -d --name discovery --network host \
#     -v /var/run/docker.sock:/var/run/docker.sock:ro \
#     --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -e DISCOVERY_REGISTRY=etcd://10.0.0.1:2379,10.0.0.2:2379/discovery \
#     discovery:latest up --service web:18000
#
# Works with the classic builder (Docker 20.10 without BuildKit) as well as BuildKit.
ARG BASE=discovery-base:bookworm

# ---------------------------------------------------------------- build: the venv, offline
# pip stays in the venv (custom check plugins: FROM discovery, pip install --no-index ...);
# setuptools is not needed at run time.
FROM ${BASE} AS build
COPY deploy/wheels/ /wheels/
RUN python3 -m venv /opt/discovery \
 && /opt/discovery/bin/pip install --no-index --find-links /wheels --no-cache-dir \
        --disable-pip-version-check --no-warn-script-location discovery \
 && /opt/discovery/bin/pip uninstall --yes --quiet setuptools \
 && /opt/discovery/bin/discovery --version

# ---------------------------------------------------------------- the image
FROM ${BASE}
ARG UID=10001
ENV PATH=/opt/discovery/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DISCOVERY_STATE_DIR=/var/lib/discovery/watch
# The user the sidecar runs as. Docker socket access comes at run time from the socket's
# group: `--group-add $(stat -c %g /var/run/docker.sock)` (or start as root: the entrypoint
# then drops to this user with that group, see deploy/entrypoint.sh).
RUN groupadd --gid "${UID}" discovery \
 && useradd --no-log-init --uid "${UID}" --gid discovery --home-dir /var/lib/discovery \
        --no-create-home --shell /usr/sbin/nologin discovery \
 && install -d -o discovery -g discovery -m 0750 /var/lib/discovery /var/lib/discovery/watch \
 && install -d -m 0755 /etc/discovery
COPY --from=build /opt/discovery /opt/discovery
COPY deploy/entrypoint.sh /usr/local/bin/docker-entrypoint
COPY deploy/healthcheck.py /usr/local/bin/discovery-healthcheck
RUN chmod 0755 /usr/local/bin/docker-entrypoint /usr/local/bin/discovery-healthcheck \
 && discovery --version

# Configuration: DISCOVERY_REGISTRY (required), DISCOVERY_NODE, DISCOVERY_ADDRESS, DISCOVERY_TTL,
# DISCOVERY_RESYNC, DISCOVERY_LOG_LEVEL, DISCOVERY_SERVICES ("web:18000 api:18001"),
# DISCOVERY_HTTP, DISCOVERY_DNS, and the TOML file DISCOVERY_CONFIG (default: this path when
# mounted). The [agent], [watcher] and [services.NAME] tables of docs/README apply.
USER discovery
WORKDIR /var/lib/discovery
STOPSIGNAL SIGTERM
# Probes the HTTP API's /v1/health (address taken from the running command's --http, default
# 127.0.0.1:8500); python + urllib, there is no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/discovery-healthcheck"]
# The entrypoint (PID 1) checks the socket and, started as root, drops to user discovery;
# then it execs tini, which stays PID 1 as that user: it forwards SIGTERM to discovery (which
# deregisters and stops HAProxy) and reaps any orphaned HAProxy worker. A tini left root
# could not signal uid 10001 without CAP_KILL (dropped with --cap-drop ALL).
ENTRYPOINT ["/usr/local/bin/docker-entrypoint"]
CMD ["up"]
LABEL org.opencontainers.image.title="discovery" \
      org.opencontainers.image.description="SmartStack-style service discovery sidecar: agent, watcher, HAProxy" \
      org.opencontainers.image.licenses="Apache-2.0"
