"""`meshctl top`: the traffic of the mesh's pods, read from their sidecars' proxies.

Every pod whose sidecar runs (from sidecar-connected to terminating) is read at its address on the metrics port,
all at once; with a window, a second time after it, for the rates. The figures are the proxy's own counters since it
started (`sidecar/traffic.py` says what each one means). A pod that does not answer is listed with the reason,
never waited on: one slow pod does not hold up the others.

It reads pods at their addresses, so it runs where those are routable: on the host of `meshctl up`, or on a node of
a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from actions.clock import SystemClock
from actions.metrics import MetricsSource, ScrapeFailed
from catalog.inject import DEFAULT_PORTS
from engine import UnknownEntity, views
from machines.pod import PodState
from meshctl import output
from meshctl.problems import UsageProblem
from sidecar.traffic import SCRAPE_PATH, BadMetrics, Direction, Edge, Traffic, rates, read
from store import Store

# The states in which a pod's sidecar may run (a failed pod's often still does; if not, it says it is unreachable).
RUNNING = frozenset({PodState.sidecar_connected.value, PodState.config_synced.value, PodState.ready.value,
                     PodState.terminating.value, PodState.failed.value})
_PARALLEL = 16  # readings at once: each is one short HTTP request


@dataclass(frozen=True, slots=True)
class PodTop:
    pod: str
    traffic: Traffic | None
    rates: dict[tuple[str, str], float] | None  # requests per second by edge key; None without a window
    problem: str | None  # why there is no traffic to show


def _pods(store: Store, ref: str | None, namespace: str | None) -> list[views.PodView]:
    if ref is not None and namespace is not None:
        raise UsageProblem("give one pod (pod/<namespace>/<name>) or --namespace, not both")
    pods = views.pods(store, SystemClock().now())
    if ref is None:
        return [p for p in pods if namespace is None or p.pod.startswith(f"{namespace}/")]
    kind, _, key = ref.partition("/")
    if kind != "pod" or key.count("/") != 1:
        raise UsageProblem(f"'{ref}': meshctl top shows a pod, as pod/<namespace>/<name>")
    chosen = [p for p in pods if p.pod == key]
    if not chosen:
        raise UnknownEntity("pod", key)
    return chosen


def collect(store: Store, source: MetricsSource, *, ref: str | None = None, namespace: str | None = None,
            window: float = 1.0, sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> list[PodTop]:
    """Each chosen pod's traffic; with a window above 0, read twice that far apart for the rates."""
    pods = _pods(store, ref, namespace)
    reachable = [p for p in pods if p.state in RUNNING and p.ip]
    port = DEFAULT_PORTS.metrics

    def scrape(pod: views.PodView) -> tuple[Traffic | str, float]:
        assert pod.ip is not None
        try:
            traffic: Traffic | str = read(source.scrape(pod.ip, port, SCRAPE_PATH))
        except (ScrapeFailed, BadMetrics) as exc:
            traffic = f"its proxy's metrics at {pod.ip}:{port}: {exc.reason if isinstance(exc, ScrapeFailed) else exc}"
        return traffic, clock()

    with ThreadPoolExecutor(max_workers=max(1, min(_PARALLEL, len(reachable)))) as pool:
        first = dict(zip((p.pod for p in reachable), pool.map(scrape, reachable), strict=True))
        second = {}
        if window > 0 and any(isinstance(traffic, Traffic) for traffic, _ in first.values()):
            sleep(window)
            second = dict(zip((p.pod for p in reachable), pool.map(scrape, reachable), strict=True))
    out = []
    for p in pods:
        if p.pod not in first:
            why = "it has no address yet" if not p.ip else "its sidecar is not running"
            out.append(PodTop(p.pod, None, None, f"{why} (state {p.state})"))
            continue
        (before, t0), (after, t1) = first[p.pod], second.get(p.pod, first[p.pod])
        if isinstance(after, str):
            out.append(PodTop(p.pod, None, None, after))
        elif isinstance(before, Traffic) and t1 > t0:
            out.append(PodTop(p.pod, after, rates(before, after, t1 - t0), None))
        else:
            out.append(PodTop(p.pod, after, None, None))
    return out


# ---- output -------------------------------------------------------------------------------------------------------
def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def _rate(top: PodTop, edges: Sequence[Edge]) -> str:
    if top.rates is None:
        return "-"
    return f"{sum(top.rates.get(e.key, 0.0) for e in edges):.1f}"


def print_pods(tops: Sequence[PodTop], *, window: float, namespace: str | None = None) -> None:
    if not tops:
        output.console.print(f"no pods in the mesh{f' in namespace {namespace}' if namespace else ''}")
        return
    columns = ["POD", "INBOUND", "IN RPS", "IN SUCCESS", "REFUSED", "OUTBOUND", "OUT RPS", "OUT SUCCESS"]
    if window <= 0:
        columns = [c for c in columns if "RPS" not in c]
    t = output.table(*columns, "NOTE")
    for top in tops:
        if top.traffic is None:
            t.add_row(top.pod, *["-"] * (len(columns) - 1), top.problem or "")
            continue
        row = [top.pod]
        for direction in (Direction.inbound, Direction.outbound):
            edges = [e for e in top.traffic.edges if e.direction is direction]
            row += [str(top.traffic.total(direction))]
            if window > 0:
                row.append(_rate(top, edges))
            row.append(_percent(top.traffic.success(direction)))
            if direction is Direction.inbound:
                row.append(str(top.traffic.refused))
        t.add_row(*row, "")
    output.console.print(t)


def print_pod(top: PodTop, *, window: float) -> None:
    output.console.print(f"[bold]pod/{top.pod}[/bold]")
    if top.traffic is None:
        output.console.print(top.problem or "no traffic")
        return
    if not top.traffic.edges and not top.traffic.refused:
        output.console.print("no traffic through its sidecar yet")
        return
    columns = ["DIRECTION", "PEER", "PROTOCOL", "REQUESTS", "RPS", "SUCCESS", "4XX", "5XX", "ERRORS", "AVG TIME",
               "MAX TIME"]
    if window <= 0:
        columns.remove("RPS")
    t = output.table(*columns)
    for e in top.traffic.edges:
        row = [e.direction.value, e.peer, e.protocol, str(e.requests)]
        if window > 0:
            row.append(_rate(top, [e]))
        layer7 = bool(e.responses) or e.protocol != "tcp"
        row += [_percent(e.success), str(e.responses.get("4xx", 0)) if layer7 else "-",
                str(e.responses.get("5xx", 0)) if layer7 else "-", str(e.errors), _seconds(e.avg_seconds),
                _seconds(e.max_seconds)]
        t.add_row(*row)
    output.console.print(t)
    if top.traffic.refused:
        output.console.print(f"{top.traffic.refused} inbound request(s) or connection(s) refused by the mesh "
                             "(access control, rate limit, body size)")


def as_json(tops: Sequence[PodTop]) -> list[dict[str, Any]]:
    rows = []
    for top in tops:
        row: dict[str, Any] = {"pod": top.pod, "problem": top.problem}
        if top.traffic is not None:
            row["refused"] = top.traffic.refused
            row["edges"] = [
                {"direction": e.direction.value, "peer": e.peer, "protocol": e.protocol, "requests": e.requests,
                 "rps": None if top.rates is None else round(top.rates.get(e.key, 0.0), 3),
                 "success": e.success, "responses": dict(e.responses), "errors": e.errors,
                 "avg_seconds": e.avg_seconds, "max_seconds": e.max_seconds}
                for e in top.traffic.edges]
        rows.append(row)
    return rows
