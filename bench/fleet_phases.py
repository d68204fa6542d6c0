"""``bench/fleet.py``'s measured phases at each size of the fleet: the steady state, one change
to every host's catalog, a host dying, and a full registry restart (the module docstring of
``fleet.py`` says what each measures). Each emits one row of the report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from common import percentile, say
from fleet_host import HOT, VICTIM_BASE, host_instances
from fleet_procs import all_workers
from fleet_servers import CLK_TCK, ETCD_GAUGES, ZK_KEYS, RateSampler, bytes_delta, total
from fleet_setup import FleetSetup
from procs import cpu_ticks, rss_kib
from zk_requests import by_type_between, per_second

from discovery.errors import RegistryError
from discovery.registry.etcd_watch import NARROW_AFTER
from discovery.registry.owned import OWN_LATER
from discovery.retry import RESUME_SPREAD

#: a restart's peak rate counts as measured (for the target) only over samples this close
PEAK_WINDOW_MAX_S = 1.5


def _r(v: float | None, d: int = 2) -> float | None:
    return None if v is None else round(v, d)


def dist(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": _r(percentile(values, 0.5)), "p99": _r(percentile(values, 0.99)),
            "max": _r(max(values)) if values else None, "min": _r(min(values)) if values else None}


class Fleet(FleetSetup):
    """The phases, run by :meth:`run` at each size."""

    def steady(self, size: int) -> dict[str, Any]:
        say(f"{self.backend} {size}: settling {self.args.settle:g}s, then steady state for "
            f"{self.args.steady:g}s")
        self.freeze()
        time.sleep(self.args.settle)
        c0, b0, u0 = self.servers.counters(), self.sockets(), self.servers.usage()
        relay0 = cpu_ticks(self.relay.pid, tree=False) if self.relay else 0
        proxy0 = cpu_ticks(self.proxy.pid, tree=False) if self.proxy and self.proxy.pid else 0
        s0 = all_workers(self.workers, "stats")
        t0, t0_wall = time.monotonic(), time.time()
        time.sleep(self.args.steady)
        wall = time.monotonic() - t0
        kinds = self.client_requests(t0_wall)
        c1, b1, u1 = self.servers.counters(), self.sockets(), self.servers.usage()
        s1 = all_workers(self.workers, "stats")
        relay_cpu = (round(100 * (cpu_ticks(self.relay.pid, tree=False) - relay0) / CLK_TCK
                           / wall, 1) if self.relay else None)
        proxy_cpu = (round(100 * (cpu_ticks(self.proxy.pid, tree=False) - proxy0) / CLK_TCK
                           / wall, 1) if self.proxy and self.proxy.pid else None)
        n = len(self.hosts)
        req = total(c1) - total(c0)
        methods = sorted({k for c in c1 if c for k in c if k.startswith("req.")})
        by_method = {m[4:]: round((total(c1, m) - total(c0, m)) / wall / n, 4) for m in methods
                     if total(c1, m) - total(c0, m) > 0}
        hosts_bytes = self.per_host(bytes_delta(b0, b1))
        sent = [b[0] / wall for b in hosts_bytes]
        recv = [b[1] / wall for b in hosts_bytes]
        r0 = {row[0]: row for s in s0 for row in s["reads"]}
        read_b = [(row[1] - r0.get(row[0], [0, 0])[1]) / wall for s in s1 for row in s["reads"]]
        read_k = [(row[2] - r0.get(row[0], [0, 0, 0])[2]) / wall for s in s1 for row in s["reads"]]
        conns = self.connections(b1)
        gauges = {k: total(c1, k) for k in (*ETCD_GAUGES, *ZK_KEYS)
                  if any(c and k in c for c in c1)}
        row = {"name": "fleet_steady", "backend": self.backend, "size": size,
               "window_s": round(wall, 1),
               "requests_per_s_per_host": round(req / wall / n, 4),
               "requests_per_s_total": round(req / wall, 1),
               "requests_by_method_per_s_per_host": by_method,
               # ZooKeeper: what the hosts sent (zk_requests), by type
               "client_requests_by_type_per_s_per_host": {
                   k: round(v / wall / n, 4)
                   for k, v in by_type_between(kinds, t0_wall, t0_wall + wall).items()}
               if kinds else None,
               "client_sent_bytes_per_s_per_host": dist(sent),
               "client_received_bytes_per_s_per_host": dist(recv),
               "client_bytes_per_s_per_host_mean": round((sum(sent) + sum(recv)) / n, 1),
               "reads_bytes_per_s_per_host": dist(read_b),
               "reads_keys_per_s_per_host": dist(read_k),
               "reads_bytes_per_s_per_host_mean": round(sum(read_b) / n, 1),
               "connections": conns,
               "reconciles": sum(s["reconciles"] for s in s1) - sum(s["reconciles"] for s in s0),
               "reconcile_errors": sum(s["reconcile_errors"] for s in s1),
               "reregistered": sum(s["reregistered"] for s in s1),
               "server_rss_mib": u1["rss_mib"],
               "server_cpu_pct": self._cpu_pct(u0, u1, wall),
               "relay_cpu_pct": relay_cpu, "proxy_cpu_pct": proxy_cpu,
               "relay_rss_mib": round(rss_kib(self.relay.pid).get("VmRSS", 0) / 1024, 1)
               if self.relay else None,
               "worker_rss_mib": [round(s["rss_kib"] / 1024) for s in s1],
               "worker_threads": [s["threads"] for s in s1],
               "worker_cpu_ms_per_host_s": round(
                   1000 * (sum(s["cpu_ticks"] for s in s1) - sum(s["cpu_ticks"] for s in s0))
                   / CLK_TCK / wall / n, 3),
               # --full-gc between-phases: what a host's share of its worker's heap is
               "worker_heap": dict(self.gc_model),
               "server": gauges, "host_loadavg": list(os.getloadavg())}
        return self.report.emit(row)
    def changes(self, size: int, idle_ms_per_host_s: float) -> dict[str, Any]:
        """``idle_ms_per_host_s``: the workers' CPU per host in the steady state, taken off
        their CPU during the changes to give what one delivery cost them."""
        assert self.writer is not None
        lat_all: list[float] = []
        per_change = []
        missing_total = 0
        b0 = self.sockets()
        cpu0, members0 = self.workers_sample()[0], self.servers.usage()
        requests0 = total(self.servers.counters())
        t_changes, wall0 = time.monotonic(), time.time()
        for i in range(self.args.changes):
            if i % 2 == 0:
                self.probe_seq += 1
                inst = self.probe(self.probe_seq)
                armed = self._arm("put", HOT, [inst.key])
                t0 = time.time()
                self.writer.register(inst)
            else:
                armed = self._arm("gone", HOT, [inst.key])
                t0 = time.time()
                self.writer.deregister(inst.service, inst.id)
            lat, missing = self._collect(self.args.change_timeout, t0)
            lat_all += lat
            missing_total += len(missing)
            per_change.append({"kind": "put" if i % 2 == 0 else "delete", "armed": armed,
                               "reached": len(lat), **dist(lat)})
            time.sleep(self.args.change_gap)
        changes_s = time.monotonic() - t_changes
        cpu_s = self.workers_sample()[0] - cpu0
        members_s = sum(c or 0.0 for c in self._cpu_s(members0, self.servers.usage()))
        requests = total(self.servers.counters()) - requests0
        b1 = self.sockets()
        deliveries = max(len(lat_all), 1)
        idle_s = idle_ms_per_host_s / 1000 * len(self.hosts) * changes_s
        recv = sum(b[1] for b in self.per_host(bytes_delta(b0, b1)))
        self.samples.setdefault("change_latency_ms", {})[str(size)] = [round(x, 2)
                                                                       for x in lat_all]
        p99 = percentile(lat_all, 0.99)
        expected = len(self.hosts) * self.args.changes
        ok = len(lat_all) == expected and p99 <= self.args.target_change_ms
        return self.report.emit({
            "name": "fleet_change", "backend": self.backend, "size": size,
            "n": len(lat_all), "expected": expected, "hosts_missed": missing_total,
            "p50_ms": _r(percentile(lat_all, 0.5)), "p99_ms": _r(p99),
            "max_ms": _r(max(lat_all)) if lat_all else None,
            "per_change": per_change,
            "received_bytes_per_change_all_hosts": round(recv / self.args.changes),
            "received_bytes_per_change_per_host": round(recv / self.args.changes
                                                        / len(self.hosts), 1),
            "changes_window_s": round(changes_s, 1),
            # the simulated hosts' own CPU: one delivery (a watch event into a host's catalog)
            # costs a worker this much; the hosts of a worker take their turn on its one GIL,
            # and all workers share the machine's cores with the registry members
            "worker_cpu_s": round(cpu_s, 2),
            "worker_cpu_us_per_delivery": round(max(cpu_s - idle_s, 0) / deliveries * 1e6),
            # the registry members' CPU and the requests they counted in the same window
            # (steady traffic included)
            "members_cpu_s": round(members_s, 2),
            "members_requests": round(requests),
            # a worker's collections, each holding the thread that made it (docs/benchmarks.md)
            "worker_gc_pauses": self.gc_pauses(wall0),
            "note_bytes": "includes the steady traffic of the window",
            "target": f"every host, p99 <= {self.args.target_change_ms:g} ms", "pass": ok})

    def death(self, size: int, k: int) -> dict[str, Any]:
        victim = VICTIM_BASE + 10 * k
        say(f"{self.backend} {size}: a host dies (SIGKILL of its process)")
        w = self.worker(f"victim{k}")
        try:
            r = w.call("add", hosts=[victim], urls={str(victim): self.url_of(victim)})
            if r["n_failed"]:
                raise RuntimeError(f"victim did not start: {r['failed']}")
            insts = host_instances(victim, self.args.instances, self.args.services)
            hot = [i.key for i in insts if i.service == HOT]
            self._arm("put", HOT, hot)
            _, missing = self._collect(30, time.time())
            if missing:
                say(f"{len(missing)} hosts never saw the victim's {HOT} instance")
            keys = [i.key for i in insts]
            armed = sum(r["armed"] for r in all_workers(
                self.workers, "arm", kind="gone", service=HOT, keys=keys))
            t_kill = time.time()
            w.kill()
        except BaseException:
            w.kill()
            raise
        lat, missing = self._collect(self.args.ttl + 15, t_kill)
        limit = (self.args.ttl + 1) * 1000
        worst = max(lat) if lat else None
        self.samples.setdefault("death_ms", {})[str(size)] = [round(x, 1) for x in lat]
        return self.report.emit({
            "name": "fleet_host_death", "backend": self.backend, "size": size, "ttl_s":
            self.args.ttl, "n": len(lat), "expected": armed, "hosts_missed": len(missing),
            "p50_ms": _r(percentile(lat, 0.5)), "p99_ms": _r(percentile(lat, 0.99)),
            "max_ms": _r(worst), "target": f"every host, <= TTL + 1 s ({limit:g} ms)",
            "pass": bool(lat) and not missing and worst is not None and worst <= limit})
    def restart(self, size: int, steady_rate: float) -> dict[str, Any]:
        assert self.writer is not None
        say(f"{self.backend} {size}: full registry restart")
        cluster = self.servers.cluster
        self.freeze()
        expired0 = self.workers_sample()[1]
        wall0 = time.time()
        with RateSampler(self.servers, workers=[w.pid for w in self.workers]) as sampler:
            time.sleep(2)
            t_stop = time.time()
            cluster.stop()
            t_down = time.time()
            for proc in cluster.procs:  # all at once, on their data
                proc.start()
            self.probe_seq += 1
            inst = self.probe(self.probe_seq)
            armed = self._arm("put", HOT, [inst.key])
            # Serving again = the bench's own client's first write that succeeds (not every
            # member answering a probe within 1 s: under the fleet's reconnects they may not
            # for a long time, and a quorum is what the fleet needs).
            while True:
                t_write = time.time()
                try:
                    self.writer.register(inst)
                    break
                except RegistryError:
                    if time.time() - t_down > self.args.resync_timeout * 2:
                        raise
                    time.sleep(0.1)
            t_ready = t_written = time.time()
            lat, missing = self._collect(self.args.resync_timeout, t_ready)
            time.sleep(self.after_restart(t_stop))
        peak, when = sampler.peak_per_s(t_ready - 0.5)
        peak_methods = (sampler.methods_between(sampler.peak_from, when)
                        if when is not None and sampler.peak_from is not None else {})
        after = sampler.methods_between(t_ready, t_ready + 10)
        sent = self.client_requests(t_stop)
        # every host's catalog equals the registry's, for the services it follows
        check = all_workers(self.workers, "check", truth=self.truth())
        mismatched = sum(c["mismatched"] for c in check)
        expired = self.workers_sample()[1] - expired0
        self.writer.deregister(inst.service, inst.id)
        worst = max(lat) if lat else None
        ratio = peak / steady_rate if steady_rate else None
        self.samples.setdefault("restart_resync_ms", {})[str(size)] = [round(x, 1) for x in lat]
        self.samples.setdefault("restart_cpu", {})[str(size)] = sampler.cpu_by_second(t_stop, 300)
        self.samples.setdefault("restart_rate", {})[str(size)] = [
            [round(t - t_stop, 2), round(v)] for t, v in sampler.samples]
        window = when - sampler.peak_from if when and sampler.peak_from else None
        ok = (bool(lat) and not missing and worst is not None
              and worst <= self.args.target_resync_s * 1000 and mismatched == 0
              and ratio is not None and ratio <= self.args.target_peak_ratio
              and window is not None and window <= PEAK_WINDOW_MAX_S)  # else: not resolved
        return self.report.emit({
            "name": "fleet_restart", "backend": self.backend, "size": size,
            "stop_s": round(t_down - t_stop, 2), "down_to_serving_s": round(t_ready - t_down, 2),
            "probe_write_s": round(t_written - t_write, 2),
            "note": "serving again = the first probe write that succeeded",
            "n": len(lat), "expected": armed, "hosts_missed": len(missing),
            "resync_p50_ms": _r(percentile(lat, 0.5)), "resync_p99_ms": _r(percentile(lat, 0.99)),
            "resync_max_ms": _r(worst), "catalogs_mismatched_after": mismatched,
            # leases / sessions that expired meanwhile (their hosts registered again)
            "expired_during": expired,
            "worker_gc_pauses": self.gc_pauses(wall0),
            # what the members and the simulator each got of the machine, second by second
            # from the stop: [s, members' cores, workers' cores]
            "cpu_cores_by_second": sampler.cpu_by_second(t_stop, 40),
            "peak_requests_per_s": round(peak, 1),
            "peak_at_s_after_serving": _r(when - t_ready if when else None, 1),
            "steady_requests_per_s": round(steady_rate, 1),
            "peak_over_steady": _r(ratio, 1),
            # the samples around the peak span this long: over 1.5 s the peak is a lower bound
            "peak_window_s": _r(window, 2),
            "peak_window_requests_by_method": peak_methods,
            "first_10s_requests_by_method_per_host": {
                k: round(v / len(self.hosts), 2) for k, v in after.items()},
            # ZooKeeper: what the hosts sent (zk_requests), by type; per second from the stop
            "client_requests_peak_window_by_type": by_type_between(
                sent, sampler.peak_from or 0.0, when or 0.0) if sent else None,
            "client_requests_first_10s_by_type_per_host": {
                k: round(v / len(self.hosts), 2)
                for k, v in by_type_between(sent, t_ready, t_ready + 10).items()}
            if sent else None,
            "client_requests_by_second": per_second(sent, t_stop)[:40] if sent else None,
            "target": f"every host within {self.args.target_resync_s:g} s; peak <= "
                      f"{self.args.target_peak_ratio:g} x steady",
            "pass": ok})

    def after_restart(self, t_stop: float) -> float:
        """How long the restart's samples go on once every host resynced: ``--after-restart``,
        by default until what the restart sets off later is over. etcd watchers resume wide and
        go back to their k watchers ``NARROW_AFTER`` later; the watches of a host's own keys
        resume ``OWN_LATER`` resume spreads after the loss (etcd: one watcher a key; ZooKeeper:
        a ``SetWatches``). Those requests belong to this restart's peak (until 2026-12-06 the
        samples ended 5 s after the last host resynced, and the own-key watchers' creates came
        among the resumes, unseen by the bench until then), not to the next size's steady
        state."""
        if self.args.after_restart is not None:
            return float(self.args.after_restart)
        spread = RESUME_SPREAD if self.args.spread is None else self.args.spread
        later = max(NARROW_AFTER[1], OWN_LATER[1] * spread) + 2.0
        return max(5.0, t_stop + later - time.time())

    def run(self) -> None:
        self.start()
        for k, size in enumerate(self.args.sizes):
            self.grow(size)
            st = self.steady(size)
            self.changes(size, st["worker_cpu_ms_per_host_s"])
            if not self.args.skip_death:
                self.death(size, k)
            if not self.args.skip_restart:
                self.restart(size, st["requests_per_s_total"])
                time.sleep(self.args.settle)  # (what the restart set off: in its samples)
