"""The demo's topology on the real data plane: `meshctl demo`'s workloads, Services and policies (from
`meshctl.demo.manifest`) played by the test harness (tests/support/mesh.py: network namespaces, init rules, real
sidecars), traffic sent from inside the pods, and the summary read from what really came back.

It proves the pieces the demo driver puts together: the frontend's `--upstream` call goes out through its own
sidecar by the Service's name, the split, the access policy and the rate limit of the demo's manifest act as meant,
and `summarize` reads real answers. Traffic goes only to the addresses of the harness's own /24, bounded in count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from meshctl.demo import (
    CLIENT_TO_FRONTEND,
    CLIENT_TO_LIMITED,
    INTRUDER_TO_FRONTEND,
    NAMESPACE,
    TRAFFIC,
    RefusalReason,
    manifest,
    summarize,
)
from tests.support.mesh import ECHO_APP, PYTHON, LocalMesh, state_directory
from tests.support.netns import make_host_network

pytestmark = pytest.mark.integration

COUNT = {CLIENT_TO_FRONTEND: 60, INTRUDER_TO_FRONTEND: 5, CLIENT_TO_LIMITED: 30}


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[LocalMesh, dict[str, list[dict[str, Any]]]]]:
    docs = [d for d in yaml.safe_load_all(manifest([PYTHON, str(ECHO_APP)])) if d]
    [mesh_doc] = [d for d in docs if d["kind"] == "Mesh"]
    [config] = [d["spec"] for d in docs if d["kind"] == "MeshConfig"]
    policies = [d for d in docs if d["kind"] not in ("Mesh", "MeshConfig")]
    with make_host_network() as net, state_directory() as state:
        local = LocalMesh(net, state, mesh_config=config)
        with local:
            for svc in mesh_doc["spec"]["services"]:
                local.add_service(svc["namespace"], svc["name"], svc["selector"], svc["ports"])
            local.apply(policies)
            for w in mesh_doc["spec"]["workloads"]:
                pod = f"{w['name']}-0"  # one replica each
                local.add_pod(w["namespace"], pod, w["serviceAccount"], w["labels"], w["ports"],
                              app_argv=[*w["command"], "--pod", f"{w['namespace']}/{pod}"])
            calls = {}
            for label, (source, service, path) in TRAFFIC.items():
                url = f"http://{local.services[f'{NAMESPACE}/{service}']}:80{path}"
                calls[label] = local.pod(f"{NAMESPACE}/{source}-0").request(url, COUNT[label])
            yield local, calls


def test_the_client_reaches_the_frontend_over_mtls_and_the_frontend_reaches_both_backend_versions(demo):
    local, calls = demo
    summary = summarize(calls, local.trust_domain)
    outer = summary.edge(CLIENT_TO_FRONTEND)
    assert outer.successes == outer.requests == COUNT[CLIENT_TO_FRONTEND], calls[CLIENT_TO_FRONTEND][:3]
    assert outer.client_ids == (local.pod(f"{NAMESPACE}/client-0").spiffe_id,)
    inner = summary.edge("frontend -> backend")
    assert inner.successes == inner.requests >= COUNT[CLIENT_TO_FRONTEND]
    assert inner.client_ids == (local.pod(f"{NAMESPACE}/frontend-0").spiffe_id,)
    # 60 draws at 80/20: both versions answer (the chance that v2 never does is 0.8^60, about 1 in 660,000).
    assert [s.pod for s in inner.servers] == [f"{NAMESPACE}/backend-v1-0", f"{NAMESPACE}/backend-v2-0"]
    assert inner.servers[0].count > inner.servers[1].count


def test_the_intruder_is_refused_by_the_access_policy(demo):
    local, calls = demo
    edge = summarize(calls, local.trust_domain).edge(INTRUDER_TO_FRONTEND)
    assert edge.successes == 0
    assert [(r.status, r.reason) for r in edge.refusals] == [(403, RefusalReason.ACCESS_POLICY)]


def test_the_limited_route_lets_the_rate_through_and_refuses_the_excess_with_503(demo):
    local, calls = demo
    statuses = [r.get("status") for r in calls[CLIENT_TO_LIMITED]]
    assert statuses[:10] == [200] * 10, statuses
    edge = summarize(calls, local.trust_domain).edge(CLIENT_TO_LIMITED)
    assert [r.reason for r in edge.refusals] == [RefusalReason.RATE_LIMIT], statuses
