"""One poisoned registry value must never take a host down (issue 8 §1).

A hostile corpus is written straight into the registry, beside one good instance, on both
backends. Then every reader is run against it: ``discovery up`` (agent reconcile, watcher and
HAProxy, DNS, HTTP API, /metrics), the Python client, ``discovery services`` (table and
JSON), ``discovery show`` and ``discovery watch --once --dry-run``. Each keeps serving the
good instance, skips every bad one, and names a bad key in its log at most once a minute.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from discovery import Client
from discovery.model import Instance
from discovery.registry import RegistryURL, open_registry
from tests.harness.agent import REPO_ROOT, DiscoveryProcess, wait_registered
from tests.harness.fleet import close_raw, raw_client
from tests.harness.raw_clients import raw_put
from tests.harness.servers import ServerCluster
from tests.harness.util import free_port, wait_for
from tests.harness.watcher import spread

pytestmark = pytest.mark.integration

HOSTILE: dict[str, bytes] = {
    "schema-overflow": b'{"schema":1e400,"service":"S","id":"x","node":"n","address":"127.0.0.1",'
                       b'"port":1}',
    "deep-array": b"[" * 30_000 + b"]" * 30_000,
    "deep-object": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    "nan": b'{"schema":1,"service":"S","id":"ID","node":"n","address":"127.0.0.1","port":1,'
           b'"registered_at":NaN}',
    "huge-int": b'{"schema":' + b"9" * 5_000 + b"}",
    "negative-schema": b'{"schema":-5,"service":"S","id":"ID","node":"n",'
                       b'"address":"127.0.0.1","port":1}',
    "scope-injection": b'{"schema":1,"service":"S","id":"ID","node":"n","address":'
                       b'"::1%lo]:25080 init-addr none backup cookie [","port":25080}',
    "unspecified": b'{"schema":1,"service":"S","id":"ID","node":"n","address":"0.0.0.0",'
                   b'"port":80}',
    "too-large": b'{"image":"' + b"x" * 70_000 + b'"}',
    "not-json": b"\xff\xfe{",
    "empty": b"",
}


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.read().decode()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "discovery", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=60, check=False)


def poison(url: str, service: str, node: str | None = None) -> list[str]:
    """Write the corpus under ``service``; each value names its own service and key. With
    ``node``, each is also in that node's index (so its agent's reconcile reads it)."""
    parsed = RegistryURL.parse(url)
    keys = []
    for n, (name, raw) in enumerate(HOSTILE.items()):
        iid = f"bad{n}:{name[:12]}:{n + 1}"
        keys.append(key := parsed.key(service, iid))
        raw_put(url, key, raw.replace(b'"S"', f'"{service}"'.encode())
                .replace(b'"ID"', f'"{iid}"'.encode()))
        if node is not None:
            raw_put(url, f"{parsed.prefix}/nodes/{node}/{service}/{iid}", b"")
    return keys


def zk_sessions_watching(server: ServerCluster, path: str) -> set[int]:
    """The ZooKeeper sessions holding a watch on ``path`` (``wchc``: a session, then its
    paths, each on its own line)."""
    sessions, current = set(), 0
    for line in server.four_letter(0, "wchc").splitlines():
        if line.startswith("0x"):
            current = int(line, 16)
        elif line.strip() == path:
            sessions.add(current)
    return sessions


def test_every_reader_survives_the_hostile_corpus(registry_url: str, registry_server,
                                                  containers, agents, tmp_path: Path) -> None:
    web = f"h{uuid.uuid4().hex[:8]}"
    keys = poison(registry_url, web, node="hnode")
    # The agent's own container, registered while the poison is there (its reconcile reads
    # this node's entries, the poison among them, every resync), and one more good instance
    # written the ordinary way.
    listen, dns_port, http_port = free_port(), free_port(), free_port()
    state = Path(f"/tmp/dh-{uuid.uuid4().hex[:6]}")
    up = DiscoveryProcess(["up", "--registry", registry_url, "--service", f"{web}:{listen}",
                           "--dns", f"127.0.0.1:{dns_port}", "--http", f"127.0.0.1:{http_port}",
                           "--resync", "1", "--state-dir", str(state), "--node", "hnode"],
                          "up", tmp_path).start()
    agents.append(up)
    wait_for(lambda: get(http_port, "/v1/health"), 30, message="the HTTP API")
    port = containers.instance(f"{web}-1", web)
    [good] = wait_registered(registry_url, web, timeout=20)
    assert good.port == port
    if registry_url.startswith("zk:"):  # up's agent and watcher: one session, not two
        raw = raw_client(registry_url)
        try:
            owner = raw.exists(RegistryURL.parse(registry_url).key(*good.key)).ephemeralOwner
        finally:
            close_raw(raw)
        root = RegistryURL.parse(registry_url).services_root
        assert zk_sessions_watching(registry_server, root) == {owner}

    # watcher + HAProxy: routed; DNS and HTTP: answer the good one only
    wait_for(lambda: spread(listen, 2)[f"{web}-1"] == 2, 20, message="routed through HAProxy")
    cfg = (state / "haproxy.cfg").read_text()
    assert "backup cookie" not in cfg and "init-addr" not in cfg and "0.0.0.0:80" not in cfg
    served = json.loads(get(http_port, f"/v1/services/{web}"))
    assert [i["id"] for i in served] == [good.id]
    dig = subprocess.run(["dig", "+short", "-p", str(dns_port), "@127.0.0.1",
                          f"{web}.service.discovery", "A"],
                         capture_output=True, text=True, timeout=10, check=False)
    assert dig.stdout.split() == ["127.0.0.1"], dig.stdout + dig.stderr

    # several resyncs later: still up, every bad key skipped and counted, named once
    def skipped() -> int:
        found = re.search(r"^discovery_registry_invalid_records_total (\d+)",
                          get(http_port, "/metrics"), re.M)
        return int(found[1]) if found else 0

    first = wait_for(lambda: (n := skipped()) >= 2 * len(keys) and n, 20,
                     message="the bad values counted by the agent's resyncs and the watcher")
    wait_for(lambda: skipped() >= first + len(keys), 10, message="another resync")
    assert up.alive, up.log()[-3000:]
    log = up.log()
    for key in keys:  # the agent's and the watcher's registry each name it once
        assert 1 <= log.count(f"{key}:") + log.count(f"{key} ") <= 2, key
    assert "Traceback" not in log

    # a change after the poison still arrives (the watch did not stop on a bad value)
    late = Instance(service=web, id="late:000000000001:1", node="late", address="127.0.0.2",
                    port=port)
    reg = open_registry(registry_url)
    try:
        reg.register(late)
        raw_put(registry_url, RegistryURL.parse(registry_url).key(web, "late:bad:2"), b"[1e999]")
        wait_for(lambda: len(json.loads(get(http_port, f"/v1/services/{web}"))) == 2, 10,
                 message="a good instance written after the poison")

        # the other readers, one after the other
        with Client(registry_url) as client:
            assert {i.id for i in client.instances(web)} == {good.id, late.id}
        table = cli("services", "--registry", registry_url)
        assert table.returncode == 0 and web in table.stdout, table.stderr
        as_json = cli("services", web, "--registry", registry_url, "-o", "json")
        assert as_json.returncode == 0, as_json.stderr
        assert {i["id"] for i in json.loads(as_json.stdout)} == {good.id, late.id}
        shown = cli("show", web, "--registry", registry_url)
        assert shown.returncode == 0 and good.id in shown.stdout, shown.stderr
        once = cli("watch", "--registry", registry_url, "--service", f"{web}:{free_port()}",
                   "--once", "--dry-run")
        assert once.returncode == 0, once.stderr
        assert f"127.0.0.1:{port}" in once.stdout and "backup cookie" not in once.stdout
        for out in (table, as_json, shown, once):
            assert "Traceback" not in out.stderr
    finally:
        reg.close(revoke=True)


def test_a_large_value_at_alive_is_never_read_back(etcd_single: ServerCluster) -> None:
    """A watch-only host reads ``<prefix>/alive`` once a TTL (its pulse, and the revision any
    read is compared with): a megabyte put there by hand (any agent's role may write under the
    prefix) came back to every such host, ~150 MB/s at 1,000 of them at TTL 10 s. It reads the
    key's count only: the answer's header, all it uses, stays linearizable."""
    etcd_single.ensure_running()
    url = etcd_single.url(f"/t-{uuid.uuid4().hex[:12]}")
    raw_put(url, f"{RegistryURL.parse(url).prefix}/alive", b"x" * 1_000_000)
    reg = open_registry(url)
    try:
        answers = []
        ask = reg.client.get_range_response  # type: ignore[attr-defined]

        def kept(*args: object, **kw: object) -> object:
            answers.append(answer := ask(*args, **kw))
            return answer

        reg.client.get_range_response = kept  # type: ignore[attr-defined]
        assert reg.revision() > 1  # type: ignore[attr-defined]
        [answer] = answers
        assert answer.count == 1 and not answer.kvs and answer.ByteSize() < 200
    finally:
        reg.close(revoke=False)
