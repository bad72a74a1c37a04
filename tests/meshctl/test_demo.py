"""The demo's pure parts: its mesh file passes the catalog with the policies it is meant to have, its summary tells
the edges, identities, split and refusals apart, and the frontend really calls its upstream."""

from __future__ import annotations

import ipaddress
import sys
from typing import Any

import pytest
import yaml
from rich.console import Console

import catalog
from catalog import meshfile
from meshctl.demo import (
    CLIENT_TO_FRONTEND,
    CLIENT_TO_LIMITED,
    INTRUDER_TO_FRONTEND,
    RefusalReason,
    manifest,
    summarize,
    table,
    workload_of,
)
from meshctl.entry import main
from tests.apps.support import ECHO, HOST, echo, get

TD = "example.org"
APP = [sys.executable, ECHO]


def sid(account: str) -> str:
    return f"spiffe://{TD}/ns/demo/sa/{account}"


# ---- the manifest ------------------------------------------------------------------------------------------------
def _documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(manifest(APP)) if d is not None]


def test_the_demo_manifest_is_one_mesh_and_policies_that_the_mesh_file_checks_accept() -> None:
    docs = _documents()
    assert [d["kind"] for d in docs].count("Mesh") == 1
    spec = meshfile.read(docs)
    meshfile.check(spec)  # raises, naming every problem, if the catalog finds any (warnings included)
    assert sorted(p.key for p in spec.pods) == ["demo/backend-v1-0", "demo/backend-v2-0", "demo/client-0",
                                                  "demo/frontend-0", "demo/intruder-0"]
    assert {p.name: p.command[:2] for p in spec.pods} == dict.fromkeys(
        ("backend-v1-0", "backend-v2-0", "client-0", "frontend-0", "intruder-0"), tuple(APP))
    frontend = next(p for p in spec.pods if p.workload == "frontend")
    assert frontend.command[-2:] == ("--upstream", "http://backend.demo.svc/")


def test_the_demo_world_grants_client_the_frontend_and_frontend_the_backend_and_limits_client_on_limited() -> None:
    spec = meshfile.read(_documents())
    addresses = meshfile.allocate(spec, ipaddress.IPv4Network("10.9.0.0/24"), ipaddress.IPv4Network("10.9.1.0/24"),
                                  {})
    world = catalog.World(catalog.parse_all(meshfile.render(spec, addresses)))
    assert catalog.check(world) == () and catalog.warnings(world) == ()
    assert world.mesh_config.mtls_mode is catalog.MtlsMode.STRICT
    assert world.mesh_config.access_control_mode is catalog.AccessControlMode.DENY
    docs = catalog.documents(world, TD)
    [front] = docs["demo/frontend-0"].inbound
    assert [g.spiffe_id for g in front.sources] == [sid("client")]  # not the intruder
    [limit] = front.rate_limits
    assert (limit.rate, limit.sources) == ("10r/s", (sid("client"),))
    assert limit.routes is not None and [m.path_regex for m in limit.routes] == ["/limited"]
    for backend in ("demo/backend-v1-0", "demo/backend-v2-0"):
        [port] = docs[backend].inbound
        assert [g.spiffe_id for g in port.sources] == [sid("frontend")] and port.rate_limits == ()
    [split] = world.of(catalog.TrafficSplit)
    assert [(b.service, b.weight) for b in split.backends] == [("backend-v1", 80), ("backend-v2", 20)]


def test_the_demo_manifest_runs_the_application_it_is_given() -> None:
    text = manifest(["meshctl", "app"])
    mesh = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Mesh")
    assert all(w["command"][:3] == ["meshctl", "app", "serve"] for w in mesh["spec"]["workloads"])
    assert "&id" not in text and "*id" not in text  # no YAML aliases for a reader to puzzle over


# ---- the summary -------------------------------------------------------------------------------------------------
def echo_body(pod: str, account: str, client: str | None, upstream: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = {"host": "x"} | ({"x-meshloom-client-id": client} if client else {})
    body: dict[str, Any] = {"pod": pod, "serviceAccount": account, "port": 8080, "method": "GET", "path": "/",
                            "headers": headers, "peer": "127.0.0.1:1", "connection": 1, "request": 1, "body": 0}
    if upstream is not None:
        body["upstream"] = upstream
    return body


def via(backend: str) -> dict[str, Any]:
    """A frontend answer whose upstream call landed on `backend` (a pod name)."""
    inner = echo_body(f"demo/{backend}", "backend", sid("frontend"))
    return {"status": 200, "body": echo_body("demo/frontend-0", "frontend", sid("client"),
                                             {"status": 200, "body": inner, "error": None}), "t": 0.0}


BROKEN_UPSTREAM = {"status": 502, "body": echo_body("demo/frontend-0", "frontend", sid("client"), {
    "status": 0, "body": None, "error": "no answer within 5 s"}), "t": 0.0}
FORBIDDEN = {"status": 403, "body": "<html><body><h1>403 Forbidden</h1></body></html>", "t": 0.0}
LIMITED = {"status": 503, "body": "<html><body><h1>503 Service Unavailable</h1></body></html>", "t": 0.0}


def calls() -> dict[str, list[dict[str, Any]]]:
    return {
        CLIENT_TO_FRONTEND: [via("backend-v1-0")] * 8 + [via("backend-v2-0")] * 2 + [BROKEN_UPSTREAM],
        INTRUDER_TO_FRONTEND: [FORBIDDEN] * 5,
        CLIENT_TO_LIMITED: [via("backend-v1-0")] * 10 + [LIMITED] * 3 + [{"error": "TimeoutError: timed out",
                                                                          "t": 1.0}],
    }


def test_an_edge_counts_its_requests_successes_and_the_identities_both_sides_had() -> None:
    edge = summarize(calls(), TD).edge(CLIENT_TO_FRONTEND)
    assert (edge.requests, edge.successes) == (11, 10)
    assert edge.success_rate == pytest.approx(10 / 11)
    assert edge.statuses == ((200, 10), (502, 1))
    assert edge.client_ids == (sid("client"),)
    assert [(s.pod, s.service_account, s.spiffe_id, s.count) for s in edge.servers] == [
        ("demo/frontend-0", "frontend", sid("frontend"), 10)]
    [failed] = edge.refusals
    assert (failed.status, failed.count, failed.reason) == (502, 1, RefusalReason.UPSTREAM_FAILED)


def test_the_inner_edge_comes_from_the_upstream_answers_with_the_split_observed_and_the_upstream_s_failure() -> None:
    inner = summarize(calls(), TD).edge("frontend -> backend")
    assert inner.inner
    assert (inner.requests, inner.successes) == (21, 20)  # 11 + 10 upstream records
    assert inner.client_ids == (sid("frontend"),)
    assert [(s.pod, s.count, s.percent) for s in inner.servers] == [("demo/backend-v1-0", 18, 90.0),
                                                                    ("demo/backend-v2-0", 2, 10.0)]
    assert inner.split == (("backend-v1-0", 90.0), ("backend-v2-0", 10.0))
    assert {s.spiffe_id for s in inner.servers} == {sid("backend")}
    assert inner.errors == (("no answer within 5 s", 1),)


def test_403s_are_the_access_policy_and_503s_on_a_rate_limited_edge_are_the_limit() -> None:
    summary = summarize(calls(), TD)
    denied = summary.edge(INTRUDER_TO_FRONTEND)
    assert (denied.requests, denied.successes, denied.client_ids, denied.servers) == (5, 0, (), ())
    assert [(r.status, r.count, r.reason) for r in denied.refusals] == [(403, 5, RefusalReason.ACCESS_POLICY)]
    limited = summary.edge(CLIENT_TO_LIMITED)
    assert (limited.requests, limited.successes) == (14, 10)
    assert [(r.status, r.count, r.reason) for r in limited.refusals] == [(0, 1, RefusalReason.NO_ANSWER),
                                                                         (503, 3, RefusalReason.RATE_LIMIT)]
    assert limited.refusals[1].text == "3 x 503 over the 10r/s rate limit"
    assert limited.errors == (("TimeoutError: timed out", 1),)


def test_a_503_on_an_edge_without_a_rate_limit_is_only_unavailable() -> None:
    edge = summarize({"client -> backend": [LIMITED]}, TD).edge("client -> backend")
    assert [r.reason for r in edge.refusals] == [RefusalReason.UNAVAILABLE]


def test_the_table_has_a_row_per_edge_with_its_notes_readable_at_a_glance() -> None:
    console = Console(record=True, width=400)
    console.print(table(summarize(calls(), TD)))
    text = console.export_text()
    lines = {line.strip().split("  ")[0]: line for line in text.splitlines() if " -> " in line}
    lines.pop("EDGE")
    assert set(lines) == {CLIENT_TO_FRONTEND, INTRUDER_TO_FRONTEND, CLIENT_TO_LIMITED, "frontend -> backend"}
    assert "refused 5 x 403 by the access policy" in lines[INTRUDER_TO_FRONTEND]
    assert "0.0%" in lines[INTRUDER_TO_FRONTEND]
    assert "3 x 503 over the 10r/s rate limit" in lines[CLIENT_TO_LIMITED]
    assert "split backend-v1-0 90% / backend-v2-0 10%" in lines["frontend -> backend"]
    assert f"{sid('client')} -> {sid('frontend')}" in lines[CLIENT_TO_FRONTEND]
    assert f"{sid('frontend')} -> {sid('backend')}" in lines["frontend -> backend"]
    assert "90.9%" in lines[CLIENT_TO_FRONTEND]
    assert "1 x TimeoutError: timed out" in lines[CLIENT_TO_LIMITED] and "no answer;" not in lines[CLIENT_TO_LIMITED]


def test_pods_belong_to_the_workload_named_before_their_replica_number() -> None:
    assert workload_of("demo/backend-v1-0") == "backend-v1"
    assert workload_of("frontend-12") == "frontend"


# ---- the application, for real -----------------------------------------------------------------------------------
@pytest.mark.integration
def test_serve_with_upstream_forwards_each_request_and_returns_the_upstream_s_answer_in_its_own() -> None:
    with echo("--pod", "demo/backend-v1-0", env={"SERVICE_ACCOUNT": "backend"}) as backend, \
            echo("--pod", "demo/frontend-0", "--upstream", f"http://{HOST}:{backend}/api/") as frontend:
        status, body = get(frontend, "/orders?id=7", method="POST")
        again_status, again = get(frontend, "/second")
    assert status == 200 and body["pod"] == "demo/frontend-0" and body["path"] == "/orders?id=7"
    upstream = body["upstream"]
    assert upstream["status"] == 200 and upstream["error"] is None
    assert upstream["body"]["pod"] == "demo/backend-v1-0" and upstream["body"]["serviceAccount"] == "backend"
    assert upstream["body"]["method"] == "POST" and upstream["body"]["path"] == "/api/orders?id=7"
    # The pool kept the upstream connection alive: the second call reused it.
    assert again_status == 200
    assert again["upstream"]["body"]["connection"] == upstream["body"]["connection"]
    assert again["upstream"]["body"]["request"] == 2


@pytest.mark.integration
def test_meshctl_app_runs_the_application(capsys: pytest.CaptureFixture[str]) -> None:
    with echo("--pod", "demo/backend-v2-0") as port:
        assert main(["app", "request", f"http://{HOST}:{port}/x", "--count", "2"]) == 0
    out = capsys.readouterr().out
    results = yaml.safe_load(out)["results"]  # JSON is YAML
    assert [(r["status"], r["body"]["pod"]) for r in results] == [(200, "demo/backend-v2-0")] * 2
