"""``GET /v1/agent/checks`` of an instance whose health is Docker's own HEALTHCHECK."""

from __future__ import annotations

import time

from tests.unit.test_agent_docker import Setup, setup  # noqa: F401  (the fixture)


def test_docker_health_has_a_since_like_every_check(setup: Setup) -> None:  # noqa: F811
    before = time.time()
    attrs = setup.run("d", "dsvc", {"discovery.check": "docker"})
    attrs["State"]["Health"] = {"Status": "healthy"}
    attrs["Config"]["Healthcheck"] = {"Test": ["CMD", "true"]}
    setup.agent._on_sync(list(setup.docker.running.values()))
    setup.wait_services(["dsvc"])
    (view,) = setup.agent.checks()
    assert view["type"] == "docker" and view["healthy"] is True
    assert view["since"] is not None and before <= view["since"] <= time.time()  # was None
    first = view["since"]
    setup.event("health_status: healthy", attrs)  # the same: since stays
    assert setup.agent.checks()[0]["since"] == first
    setup.event("health_status: unhealthy", attrs)
    (view,) = setup.agent.checks()
    assert view["healthy"] is False and view["since"] >= first
