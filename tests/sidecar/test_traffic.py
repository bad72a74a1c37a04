"""Reading a pod's traffic from its proxy's metrics.

The pages in data/ are real: HAProxy's exporter (`scope=global&scope=frontend&scope=backend`) on three pods of
`meshctl demo` after its traffic, trimmed to the series that `sidecar/traffic.py` reads. frontend-0 served 490
requests and called the backend split 384 / 106; the mesh refused 40 requests on its way in (20 from the intruder,
20 over the rate limit); client-0 got 20 of those 503s, intruder-0 the 403s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.traffic import BadMetrics, Direction, describe, rates, read

DATA = Path(__file__).parent / "data"
GOLDEN = Path(__file__).parent / "golden" / "haproxy"


def page(name: str) -> str:
    return (DATA / f"metrics-{name}.txt").read_text()


def test_a_pod_that_serves_and_calls_a_split_shows_each_leg_and_what_the_mesh_refused() -> None:
    traffic = read(page("frontend"))

    assert [(e.direction, e.peer, e.protocol, e.requests) for e in traffic.edges] == [
        (Direction.inbound, ":8080", "http", 490),
        (Direction.outbound, "demo/backend:80 > backend-v1", "http", 384),
        (Direction.outbound, "demo/backend:80 > backend-v2", "http", 106),
    ]
    assert traffic.refused == 40
    inbound = traffic.edge(Direction.inbound, ":8080")
    assert inbound is not None
    assert inbound.responses == {"2xx": 490} and inbound.success == 1.0 and inbound.errors == 0
    assert inbound.avg_seconds == pytest.approx(0.009) and inbound.max_seconds == pytest.approx(0.18)
    assert traffic.total(Direction.outbound) == 490 and traffic.success(Direction.outbound) == 1.0


def test_5xx_answers_count_against_the_callers_success() -> None:
    traffic = read(page("client"))

    (edge,) = traffic.edges
    assert (edge.direction, edge.peer, edge.requests) == (Direction.outbound, "demo/frontend:80", 510)
    assert edge.responses == {"2xx": 490, "5xx": 20}
    assert edge.success == pytest.approx(490 / 510)
    assert traffic.total(Direction.inbound) == 0 and traffic.success(Direction.inbound) is None
    assert traffic.refused == 0


def test_a_caller_refused_by_an_access_policy_has_no_success() -> None:
    (edge,) = read(page("intruder")).edges
    assert edge.responses == {"4xx": 20} and edge.success == 0.0


LAYER4 = """\
# TYPE haproxy_frontend_requests_denied_total counter
haproxy_frontend_requests_denied_total{proxy="inbound"} 2
haproxy_frontend_requests_denied_total{proxy="outbound"} 5
# TYPE haproxy_frontend_denied_connections_total counter
haproxy_frontend_denied_connections_total{proxy="inbound-mtls"} 3
# TYPE haproxy_backend_sessions_total counter
haproxy_backend_sessions_total{proxy="tcp:shop.db:5432"} 10
haproxy_backend_sessions_total{proxy="inbound:5432"} 4
haproxy_backend_sessions_total{proxy="outbound-passthrough"} 7
haproxy_backend_sessions_total{proxy="outbound-pod"} 1
haproxy_backend_sessions_total{proxy="inbound-app"} 2
haproxy_backend_sessions_total{proxy="ratelimit:8000:0"} 9
haproxy_backend_sessions_total{proxy="inbound-mtls-loop"} 9
haproxy_backend_sessions_total{proxy="http:shop.web:80"} 0
# TYPE haproxy_backend_connection_errors_total counter
haproxy_backend_connection_errors_total{proxy="tcp:shop.db:5432"} 2
# TYPE haproxy_backend_response_errors_total counter
haproxy_backend_response_errors_total{proxy="tcp:shop.db:5432"} 1
# TYPE haproxy_backend_downtime_seconds_total counter
haproxy_backend_downtime_seconds_total{proxy="tcp:shop.db:5432"} NaN
# TYPE haproxy_backend_max_total_time_seconds gauge
haproxy_backend_max_total_time_seconds{proxy="tcp:shop.db:5432"} +Inf
"""


def test_layer_4_edges_count_connections_and_their_failures_and_internal_backends_are_left_out() -> None:
    traffic = read(LAYER4)

    assert {(e.direction, e.peer): (e.protocol, e.requests, e.errors) for e in traffic.edges} == {
        (Direction.outbound, "shop/db:5432"): ("tcp", 10, 3),
        (Direction.inbound, ":5432"): ("tcp", 4, 0),
        (Direction.outbound, "(outside the mesh)"): ("tcp", 7, 0),
        (Direction.outbound, "(pods by address)"): ("tcp", 1, 0),
        (Direction.inbound, "(ports without a Service)"): ("tcp", 2, 0),
    }  # nothing for the rate-limit table, the permissive loop, or a Service nobody called
    db = traffic.edge(Direction.outbound, "shop/db:5432")
    assert db is not None and db.success == pytest.approx(0.7) and db.responses == {}
    assert db.max_seconds is None  # what HAProxy cannot say (NaN, +Inf) is left unsaid
    db_errors = 'connection_errors_total{proxy="tcp:shop.db:5432"}'
    retried = read(LAYER4.replace(f"{db_errors} 2", f"{db_errors} 12"))  # more failed attempts than connections
    assert retried.edge(Direction.outbound, "shop/db:5432").success == 0.0  # type: ignore[union-attr]
    assert traffic.refused == 5  # inbound frontends only: the outbound one's denials are its own loop guard
    assert traffic.success(Direction.outbound) == pytest.approx(15 / 18)


def test_every_backend_the_renderer_names_is_an_edge_or_one_of_the_proxys_own() -> None:
    names = {line.split()[1] for cfg in GOLDEN.glob("*.cfg") for line in cfg.read_text().splitlines()
             if line.startswith("backend ")}
    assert len(names) > 20
    internal = {n for n in names if describe(n) is None}
    assert internal == {n for n in names if n.startswith("ratelimit:") or n == "inbound-mtls-loop"}
    assert describe("grpc:shop.api:9090:api-v1") == (Direction.outbound, "shop/api:9090 > api-v1", "grpc")


def test_rates_are_per_edge_and_a_counter_that_went_down_restarted_from_zero() -> None:
    before = read(page("client"))
    after = read(page("client").replace("} 510", "} 530"))
    assert rates(before, after, 2.0) == {("outbound", "demo/frontend:80"): 10.0}

    reloaded = read(page("client").replace("} 510", "} 6"))  # a reload: a new process counts from zero
    assert rates(before, reloaded, 2.0) == {("outbound", "demo/frontend:80"): 3.0}
    assert rates(read(""), before, 10.0) == {("outbound", "demo/frontend:80"): 51.0}  # an edge new since
    assert before.started == 1795735593
    # A reload between the readings whose new process already counted past the old one: its start time tells.
    reloaded_busy = read(page("client").replace("} 510", "} 600").replace("1795735593", "1795735700"))
    assert rates(before, reloaded_busy, 2.0) == {("outbound", "demo/frontend:80"): 300.0}
    with pytest.raises(ValueError):
        rates(before, after, 0)


def test_a_page_that_is_not_an_exposition_is_refused() -> None:
    with pytest.raises(BadMetrics):
        read("<html>not found</html>\n")
