#!/usr/bin/env python3
"""Traffic quality (issue 14): outlier ejection, rolling deploys under load, slow start.

Everything on loopback: a private etcd (``discovery up --dev``'s), one ``discovery watch`` with
its HAProxy per phase, and threaded Python HTTP backends (``tests/harness/haproxy.py``) whose
answers can be a status code (a gray failure: ``/health`` still 200) or take a while. Records are
written straight into etcd, as the agent writes them. Client threads send ``Connection: close``
requests through HAProxy. Three phases, each bounded in time:

* ``outlier``: three instances, one answering 500 to traffic. Without ``outlier``: the share of
  failed requests over ``--outlier-s``. With ``outlier = { consecutive_errors = 5, interval =
  "500ms" }``: time from the first request to the ejection (``/v1/health``), failed share over
  the whole run and after the ejection.
* ``deploy``: three instances answering requests that last 0-2 s (uniform), each replaced in
  turn under load: the new one is registered, then the old one's record is deleted (what the
  agent does on Docker's ``kill`` event) while it keeps serving its in-flight requests for its
  grace period (2.5 s) before it stops. Failed requests over the whole replacement.
* ``slowstart``: two warm instances, then a cold one joins; five modes side by side in one run:
  ``none`` (registered when it starts), ``slowstart 8s`` (``server_options``), ``readiness +
  slowstart 8s`` (its ``/health`` answers 503 until its preload is done; the agent's HTTP check,
  every 2 s, rise 1, registers it when it passes), ``readiness`` alone, and ``readiness +
  warm-up + slowstart 8s`` (once the check passes, the agent's warm-up requests,
  ``discovery.warmup.requests=200`` of ``/``, two at a time, before the record). Every instance is
  one model (``bench/coldapp.py``): a time-driven preload (150 ms falling linearly to the warm
  5 ms over 8 s), a request-driven residual (its first 200 requests 25 ms falling to 5 ms,
  whenever they come) and a capacity of 2 requests at a time; warm ones have neither warm-up.
  Client p50/p99 during the 10 s after the record is written vs the steady state before it,
  and how many ramp requests were over 1.5x the steady p99.

Result: ``bench/results/deploys-etcd.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import random
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from coldapp import WARM, ColdApp, Model  # noqa: E402
from common import Report, install_signal_handlers, percentile, say  # noqa: E402
from procs import HOST, Routed, wait_until  # noqa: E402

from discovery.agent.checks import HttpCheck  # noqa: E402
from discovery.agent.spec import CheckSpec, CheckTarget, WarmupSpec  # noqa: E402
from discovery.agent.warmup import WarmupResult, warm_up  # noqa: E402
from discovery.model import Instance  # noqa: E402
from discovery.registry import Registry, open_registry  # noqa: E402
from discovery.registry.devserver import LocalEtcd  # noqa: E402
from tests.harness.haproxy import NamedBackend  # noqa: E402
from tests.harness.util import free_port  # noqa: E402

GRACE_S = 2.5  # the app serves in-flight requests this long after SIGTERM


def record(n: int, port: int) -> Instance:
    return Instance(service="web", id=f"h{n}:{n:012x}:80", node=f"h{n}", address=HOST, port=port)


class Load:
    """``threads`` clients sending requests until stopped; every outcome kept with its time."""

    def __init__(self, port: int, threads: int, path: Any = "/") -> None:
        self.port, self.threads, self.path = port, threads, path
        self.results: list[tuple[float, float, str]] = []  # (start, latency s, outcome)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _one(self) -> str:
        path = self.path() if callable(self.path) else self.path
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            return body if resp.status == 200 else f"!{resp.status}"
        except OSError as exc:
            return f"!{type(exc).__name__}"
        finally:
            conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            outcome = self._one()
            with self._lock:
                self.results.append((start, time.monotonic() - start, outcome))

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        for w in self._workers:
            w.start()
        try:
            yield self
        finally:
            self._stop.set()
            for w in self._workers:
                w.join(15)

    def window(self, start: float, end: float) -> list[tuple[float, float, str]]:
        return [r for r in self.results if start <= r[0] < end]


def failed(rows: list[tuple[float, float, str]]) -> int:
    return sum(1 for r in rows if r[2].startswith("!"))


def health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/v1/health", timeout=3) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


class Phase:
    """One watcher (with its config) over a fresh prefix, and the backends of one phase."""

    def __init__(self, etcd: LocalEtcd, work: Path, name: str, service_toml: str) -> None:
        self.url = etcd.url(f"/bench-{name}-{int(time.time())}")
        self.listen, self.api = free_port(), free_port()
        conf = work / f"{name}.toml"
        conf.write_text(f"[services.web]\nport = {self.listen}\n{service_toml}")
        self.watcher = Routed.watcher(self.url, {}, work, "--http", f"{HOST}:{self.api}",
                                      config=conf)
        self.reg: Registry = open_registry(self.url)
        self.backends: list[NamedBackend | ColdApp] = []

    def backend(self, name: str) -> NamedBackend:
        b = NamedBackend(name)
        self.backends.append(b)
        return b

    def __enter__(self) -> Phase:
        self.watcher.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.watcher.close()
        self.reg.close(revoke=True)
        for b in self.backends:
            with contextlib.suppress(Exception):
                b.stop()

    def serving(self, names: set[str], timeout: float = 20.0) -> None:
        self.watcher.wait_ready([self.listen])

        def seen() -> bool:
            got = set()
            for _ in range(4 * len(names)):
                got.add(Load(self.listen, 1)._one())
            return names <= got

        wait_until(seen, timeout, f"{sorted(names)} served")


def outlier_phase(etcd: LocalEtcd, work: Path, report: Report, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, toml in (("off", ""), ("on", 'outlier = { consecutive_errors = 5, interval = '
                                           '"500ms", base_ejection = "30s" }\n')):
        with Phase(etcd, work, f"outlier-{mode}", toml) as ph:
            bad = None
            for n, name in enumerate(("a", "b", "bad"), 1):
                b = ph.backend(name)
                ph.reg.register(record(n, b.port))
                bad = b
            ph.serving({"a", "b", "bad"})
            assert bad is not None
            bad.status = 500
            load = Load(ph.listen, 4)
            t0 = time.monotonic()
            ejected_at = None
            with load.running():
                while time.monotonic() - t0 < seconds:
                    if ejected_at is None and mode == "on" and \
                            health(ph.api)["components"]["outliers"]["ejected"]:
                        ejected_at = time.monotonic()
                    time.sleep(0.05)
            rows = load.results
            after = [r for r in rows if ejected_at is not None and r[0] >= ejected_at]
            row = report.emit({
                "name": "outlier", "mode": mode, "n": len(rows), "failed": failed(rows),
                "failed_share": round(failed(rows) / max(1, len(rows)), 4),
                "ejection_s": None if ejected_at is None else round(ejected_at - t0, 2),
                "n_after_ejection": len(after), "failed_after_ejection": failed(after),
                "pass": None if mode == "off" else (ejected_at is not None
                                                    and failed(after) == 0)})
            out[mode] = {"row": row, "samples": [(round(s - t0, 3), round(lat * 1000, 1), o)
                                                 for s, lat, o in rows]}
    return out


def deploy_phase(etcd: LocalEtcd, work: Path, report: Report) -> dict[str, Any]:
    with Phase(etcd, work, "deploy", "") as ph:
        live: dict[int, NamedBackend] = {}
        for n in (1, 2, 3):
            live[n] = ph.backend(f"v1-{n}")
            ph.reg.register(record(n, live[n].port))
        ph.serving({f"v1-{n}" for n in (1, 2, 3)})
        load = Load(ph.listen, 8, lambda: f"/?sleep={random.uniform(0.0, 2.0):.3f}")
        t0 = time.monotonic()
        with load.running():
            time.sleep(3)
            for n in (1, 2, 3):
                new = ph.backend(f"v2-{n}")
                ph.reg.register(record(10 + n, new.port))
                wait_until(functools.partial(lambda b: b.hits > 0, new), 20, f"v2-{n} served")
                ph.reg.deregister("web", record(n, live[n].port).id)  # the agent, on `kill`
                time.sleep(GRACE_S)  # the app finishes its in-flight requests...
                live[n].stop()  # ...then exits
            time.sleep(3)
        rows = load.results
        row = report.emit({"name": "deploy", "mode": "rolling 3 of 3", "n": len(rows),
                           "failed": failed(rows), "wall_s": round(time.monotonic() - t0, 1),
                           "max_ms": round(max(r[1] for r in rows) * 1000, 1),
                           "pass": failed(rows) == 0})
        return {"row": row, "samples": [(round(s - t0, 3), round(lat * 1000, 1), o)
                                        for s, lat, o in rows]}


SLOW_MODES = (  # (mode, server_options, /health waits for the preload, agent warm-up requests)
    ("none", "", False, False),
    ("slowstart 8s", 'server_options = "slowstart 8s"\n', False, False),
    ("readiness + slowstart 8s", 'server_options = "slowstart 8s"\n', True, False),
    ("readiness", "", True, False),
    ("readiness + warm-up + slowstart 8s", 'server_options = "slowstart 8s"\n', True, True),
)


def registered_when_healthy(ph: Phase, n: int, app: ColdApp, timeout: float,
                            warmup: WarmupSpec | None = None) -> tuple[float, WarmupResult | None]:
    """What the agent does: run the instance's HTTP check on ``/health`` every interval (the
    agent's default 2 s, rise 1), then, with ``warmup`` (``discovery.warmup.*``), send the
    warm-up requests (the function the agent's warm-up thread runs), and write the record;
    returns that moment and the warm-up's outcome."""
    check = HttpCheck(CheckSpec(type="http", params={"path": "/health"}),
                      CheckTarget(HOST, app.port, ""))
    deadline = time.monotonic() + timeout
    while not check.run().ok:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{app.name}: /health never passed in {timeout:g}s")
        time.sleep(check.spec.interval)
    warmed = warm_up(HOST, app.port, warmup) if warmup is not None else None
    ph.reg.register(record(n, app.port))
    return time.monotonic(), warmed


def slowstart_phase(etcd: LocalEtcd, work: Path, report: Report,
                    steady_s: float, ramp_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = Model()
    for number, (mode, toml, readiness, warming) in enumerate(SLOW_MODES):
        with Phase(etcd, work, f"slow-{number}", toml) as ph:
            warm = [ColdApp(f"warm-{n}", WARM) for n in (1, 2)]
            ph.backends.extend(warm)  # stopped with the phase
            for n, b in enumerate(warm, 1):
                ph.reg.register(record(n, b.port))
            ph.serving({"warm-1", "warm-2"})
            load = Load(ph.listen, 4)
            warmed = None
            with load.running():
                started = time.monotonic()
                if readiness:  # the app starts now; the agent registers it once /health passes
                    cold = ColdApp("cold", replace(model, readiness=True))
                    ph.backends.append(cold)
                    # the agent's warm-up as the cold app's labels would ask it: the model's
                    # residual_n requests of / (discovery.warmup.requests=200)
                    warmup = WarmupSpec(requests=model.residual_n) if warming else None
                    joined, warmed = registered_when_healthy(ph, 3, cold, 30.0, warmup)
                else:  # the app starts and is registered at once (a TCP check passes)
                    time.sleep(steady_s)
                    cold = ColdApp("cold", model)
                    ph.backends.append(cold)
                    ph.reg.register(record(3, cold.port))
                    joined = time.monotonic()
                time.sleep(max(0.0, joined + ramp_s - time.monotonic()))
            steady = [r[1] * 1000 for r in load.window(started + 1, joined)]
            ramp_rows = load.window(joined, joined + ramp_s)
            ramp = [r[1] * 1000 for r in ramp_rows]
            share = [sum(1 for r in load.window(joined + k, joined + k + 1) if r[2] == "cold")
                     / max(1, len(load.window(joined + k, joined + k + 1)))
                     for k in range(int(ramp_s))]
            p99s, p99r = percentile(steady, 0.99), percentile(ramp, 0.99)
            over = sum(1 for x in ramp if x > 1.5 * p99s)
            row = report.emit({
                "name": "slowstart", "mode": mode, "n": len(steady) + len(ramp),
                "steady_p50_ms": round(percentile(steady, 0.5), 1),
                "steady_p99_ms": round(p99s, 1),
                "ramp_p50_ms": round(percentile(ramp, 0.5), 1), "ramp_p99_ms": round(p99r, 1),
                "ratio": round(p99r / p99s, 2), "failed": failed(ramp_rows),
                "ramp_n": len(ramp), "ramp_over_1.5x": over,
                "cold_requests_in_ramp": sum(1 for r in ramp_rows if r[2] == "cold"),
                "traffic_after_start_s": round(joined - cold.started, 2),
                "warmup": None if warmed is None else {
                    "requests": warmed.sent, "errors": warmed.errors,
                    "seconds": round(warmed.seconds, 2), "complete": warmed.complete},
                "cold_share_per_s": [round(x, 2) for x in share],
                "model": {k: v for k, v in asdict(model).items() if k != "readiness"},
                "target": "ramp p99 <= 1.5 x steady",
                "pass": (p99r <= 1.5 * p99s) if mode != "none" else None})
            out[mode] = {"row": row, "steady_ms": [round(x, 1) for x in steady],
                         "ramp_ms": [round(x, 1) for x in ramp]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outlier-s", type=float, default=15.0)
    parser.add_argument("--steady-s", type=float, default=10.0)
    parser.add_argument("--ramp-s", type=float, default=10.0)
    parser.add_argument("--only", choices=["outlier", "deploy", "slowstart"], default=None,
                        help="run one phase and save nothing (a try; the result keeps every row)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    install_signal_handlers()
    report = Report()
    mark = report.mark()
    etcd = LocalEtcd().start()
    work = Path(tempfile.mkdtemp(prefix="bench-deploys-"))
    samples: dict[str, Any] = {}
    try:
        if args.only in (None, "outlier"):
            say("outlier ejection")
            samples["outlier"] = outlier_phase(etcd, work, report, args.outlier_s)
        if args.only in (None, "deploy"):
            say("rolling deploy under load")
            samples["deploy"] = deploy_phase(etcd, work, report)
        if args.only in (None, "slowstart"):
            say("slow start onto a cold instance")
            samples["slowstart"] = slowstart_phase(etcd, work, report, args.steady_s,
                                                   args.ramp_s)
    finally:
        etcd.stop()
    if not (args.no_save or args.only):
        report.save("deploys", "etcd", mark, samples)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
