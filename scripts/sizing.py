"""The sizing of docs/operations.md (issue 11 §4), computed from the fleet bench's results.

Two generated blocks: ``sizing-measured``, what ``bench/fleet.py`` measured a host at each
size on each backend (``bench/results/fleet-etcd.json``, ``fleet-zk.json``), and ``sizing``,
the fleets of 100, 1,000 and 10,000 hosts computed from it. **The method is this module**:

* a steady figure a host (requests, bytes, connections, watches) is its mean over the
  measured sizes, and the fleet's is that times the hosts: linear, which the measured sizes
  check (the per-host figures of ``sizing-measured`` are flat from 250 to 1,000);
* a member's memory is the least-squares line through the sizes' mean member RSS;
* registry data is the bytes a member holds an instance (the members' own counters over the
  instances stored) times the instances;
* a change costs the bytes a following host received for it times the hosts following it;
* a full re-read costs the bytes a host's reconcile read an instance times the instances read.

A full restart's burst is not modelled: its peak is not flat over the sizes (it depends on
how closely the hosts come back), so ``sizing-measured`` shows it as measured.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from docgen import TIMES, Result, fleet_rows, mean, missing, num, table

#: the backends' result files, in the order of the tables' columns
STEMS = {"etcd": "fleet-etcd", "ZooKeeper": "fleet-zk"}
#: the fleet bench's options the model needs, and their defaults (a run's command may set them)
PARAMS = {"instances": 10.0, "services": 100.0, "watch-services": 5.0, "resync": 30.0}
FLEETS = (100, 1000, 10000)
RENEWALS = {"etcd": "LeaseKeepAlive", "ZooKeeper": "Ping"}


@dataclass(frozen=True)
class Run:
    """One backend's fleet run: its rows by (phase, size) and the options it ran with."""

    backend: str
    rows: dict[tuple[str, int], dict[str, Any]]
    params: dict[str, float]
    commit: str

    @property
    def sizes(self) -> list[int]:
        return sorted({size for name, size in self.rows if name == "fleet_steady"})

    def row(self, name: str, size: int) -> dict[str, Any]:
        return self.rows.get((name, size), {})

    def per_size(self, fn: Callable[[dict[str, Any], int], Any], name: str = "fleet_steady"
                 ) -> list[Any]:
        return [fn(self.row(name, z), z) if self.row(name, z) else None for z in self.sizes]

    def flat(self, fn: Callable[[dict[str, Any], int], Any]) -> float:
        """A per-host figure's mean over the sizes (they are flat: see sizing-measured)."""
        return mean(self.per_size(fn)) or 0.0


def runs(results: dict[str, Result]) -> list[Run]:
    out = []
    for backend, stem in STEMS.items():
        res = results.get(stem)
        if res is None:
            continue
        params = {k: float(m.group(1)) if (m := re.search(rf"--{k}[ =]([0-9.]+)",
                                                          res["command"])) else v
                  for k, v in PARAMS.items()}
        out.append(Run(backend, fleet_rows(results, stem), params,
                       str(res.get("machine", {}).get("commit", ""))[:7]))
    return out


# ---- per-host figures of one steady row (row, size) -> value ------------------------------


def _by_type(st: dict[str, Any]) -> dict[str, float]:
    return st.get("requests_by_method_per_s_per_host") or st.get(
        "client_requests_by_type_per_s_per_host") or {}


def _members(st: dict[str, Any]) -> int:
    return len(st.get("server_rss_mib") or [1])


def _data_per_instance(run: Run) -> Callable[[dict[str, Any], int], float | None]:
    key = ("etcd_mvcc_db_total_size_in_use_in_bytes" if run.backend == "etcd"
           else "zk_approximate_data_size")
    inst = run.params["instances"]
    return lambda st, z: (st["server"].get(key) or 0) / _members(st) / (z * inst) or None


def _watches(run: Run) -> Callable[[dict[str, Any], int], float | None]:
    key = "etcd_debugging_mvcc_watcher_total" if run.backend == "etcd" else "zk_watch_count"
    return lambda st, z: st["server"].get(key, 0) / z or None


def _renewals(run: Run) -> Callable[[dict[str, Any], int], float | None]:
    return lambda st, z: _by_type(st).get(RENEWALS[run.backend])


def _change_bytes(ch: dict[str, Any], z: int) -> float:
    return ch["received_bytes_per_change_per_host"]


def _read_per_resync(run: Run) -> Callable[[dict[str, Any], int], float]:
    return lambda st, z: st["reads_bytes_per_s_per_host_mean"] * run.params["resync"]


def _first_10s(rs: dict[str, Any], z: int) -> float:
    """Requests a host made in its first 10 s after the registry served again."""
    return sum((rs.get("first_10s_requests_by_method_per_host") or rs.get(
        "client_requests_first_10s_by_type_per_host") or {}).values())


def _kb(b: float | None) -> str:
    return "—" if b is None else f"{b / 1000:,.2f} KB"


def _bytes(b: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= div:
            return f"~{b / div:,.{0 if b >= 10 * div else 1}f} {unit}"
    return f"~{b:,.0f} B"


def _fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least squares: (intercept, slope)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
             / (sum((x - mx) ** 2 for x in xs) or 1))
    return my - slope * mx, slope


def _rss(st: dict[str, Any], z: int) -> float | None:
    return mean(st.get("server_rss_mib") or [])


def t_sizing_measured(results: dict[str, Result]) -> str:
    """What the fleet bench measured a host, at each size, on each backend."""
    rs = runs(results)
    if not rs:
        return missing(*STEMS.values())
    lines: list[tuple[str, Callable[[Run], Iterable[Any]]]] = [
        ("requests/s, steady", lambda r: (num(v, 3) for v in r.per_size(
            lambda st, z: st["requests_per_s_per_host"]))),
        ("of which lease keepalives (etcd) / session pings (ZooKeeper)", lambda r: (
            num(v, 3) for v in r.per_size(_renewals(r)))),
        ("bytes/s sent / received (p50)", lambda r: r.per_size(
            lambda st, z: f"{num(st['client_sent_bytes_per_s_per_host']['p50'], 0)} / "
                          f"{num(st['client_received_bytes_per_s_per_host']['p50'], 0)}")),
        ("bytes read a resync (the node's own instances)", lambda r: (
            _kb(v) for v in r.per_size(_read_per_resync(r)))),
        ("connections to the members", lambda r: (num(v, 2) for v in r.per_size(
            lambda st, z: st["connections"] / z))),
        ("watches, as the members count them", lambda r: (
            num(v, 1) for v in r.per_size(_watches(r)))),
        ("registry data an instance, a member", lambda r: (
            _kb(v) for v in r.per_size(_data_per_instance(r)))),
        ("member RSS (mean of the members)", lambda r: (
            f"{num(v, 0)} MiB" for v in r.per_size(_rss))),
        ("bytes received for one change, a following host", lambda r: (
            num(v, 0) for v in r.per_size(_change_bytes, "fleet_change"))),
        ("one change reached every host: p99", lambda r: (
            f"{num(v, 0)} ms" for v in r.per_size(lambda ch, z: ch["p99_ms"], "fleet_change"))),
        ("full restart: requests a host in its first 10 s back (steady: 10 x the first row)",
         lambda r: (num(v, 1) for v in r.per_size(_first_10s, "fleet_restart"))),
        ("full restart: every host resynced within / peak over steady", lambda r: r.per_size(
            lambda x, z: f"{num(x['resync_max_ms'] / 1000, 1)} s / "
                         f"{num(x['peak_over_steady'])}{TIMES}", "fleet_restart")),
    ]
    head = ["a host"] + [f"{r.backend} {num(z)} hosts" for r in rs for z in r.sizes]
    body = [[label] + ["—" if v is None else v for r in rs for v in fn(r)]
            for label, fn in lines]
    src = ", ".join(f"{r.backend} at `{r.commit}`" for r in rs)
    return table(head, body) + f"\n\nMeasured runs: {src}."


def _each(rs: list[Run], cell: Callable[[Run, int], str], n: int) -> str:
    return ", ".join(f"{r.backend} {cell(r, n)}" for r in rs)


def t_sizing(results: dict[str, Result]) -> str:
    """The fleets of :data:`FLEETS` hosts, computed from :func:`t_sizing_measured`'s figures."""
    rs = runs(results)
    if not rs:
        return missing(*STEMS.values())

    def row(label: str, cell: Callable[[Run, int], str]) -> list[str]:
        return [label] + [_each(rs, cell, n) for n in FLEETS]

    def rate(fn: Callable[[dict[str, Any], int], Any], unit: str = "/s") -> Callable[
            [Run, int], str]:
        return lambda r, n: f"{num(r.flat(fn) * n, 0)}{unit}"

    fits = {r.backend: _fit(r.sizes, [v or 0.0 for v in r.per_size(_rss)]) for r in rs}

    def memory(r: Run, n: int) -> str:
        a, b = fits[r.backend]
        return f"~{num(a + b * n, 0)} MiB"

    def followed(r: Run, n: int, whole: bool) -> str:
        # a resync reads the host's own instances: its bytes an instance x the instances read
        # (a host's instances x hosts x the share of services followed)
        share = 1.0 if whole else r.params["watch-services"] / r.params["services"]
        return _bytes(r.flat(_read_per_resync(r)) * n * share)

    inst = rs[0].params["instances"]
    body = [
        ["instances"] + [num(int(inst * n)) for n in FLEETS],
        row("registry data, a member", lambda r, n: _bytes(
            r.flat(_data_per_instance(r)) * r.params["instances"] * n)),
        row("member memory (the fitted line, MiB: " + "; ".join(
            f"{r.backend} {num(a, 0)} + {num(b, 3)} a host" for r in rs
            for a, b in [fits[r.backend]]) + ")",
            memory),
        row("lease keepalives / session pings",
            lambda r, n: f"{num(r.flat(_renewals(r)) * n, 0)}/s"),
        row("steady requests, all hosts", rate(lambda st, z: st["requests_per_s_per_host"])),
        row("steady traffic, all hosts", lambda r, n: _bytes(r.flat(
            lambda st, z: st["client_sent_bytes_per_s_per_host"]["p50"]
            + st["client_received_bytes_per_s_per_host"]["p50"]) * n) + "/s"),
        row("the reconciles' reads, all hosts", lambda r, n: _bytes(
            r.flat(_read_per_resync(r)) / r.params["resync"] * n) + "/s"),
        row("connections (etcd: watch streams) on the members", rate(
            lambda st, z: st["connections"] / z, "")),
        row("watches on the members (as counted at the first size)", lambda r, n: num(
            (r.per_size(_watches(r))[0] or 0) * n, 0)),
        row("bytes sent for one change, every host following", lambda r, n: _bytes(
            (mean(r.per_size(_change_bytes, "fleet_change")) or 0.0) * n)),
        row("a full re-read, a filtered watcher (5 of 100 services)",
            lambda r, n: followed(r, n, False)),
        row("a full re-read, a whole catalog (DNS, HTTP, `up`)",
            lambda r, n: followed(r, n, True)),
    ]
    return table(["", *(f"{num(n)} hosts" for n in FLEETS)], body)


TABLES: dict[str, Callable[[dict[str, Result]], str]] = {
    "sizing-measured": t_sizing_measured,
    "sizing": t_sizing,
}
