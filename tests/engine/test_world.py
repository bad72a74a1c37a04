"""The world and the rollouts: a change of the world reaches exactly the sidecars whose documents changed."""

from __future__ import annotations

import copy
from typing import Any

from actions.clock import SystemClock
from engine import world
from tests.catalog import topology
from tests.engine.support import Mesh


def _apply(mesh: Mesh, manifests: list[dict[str, Any]]) -> None:
    world.apply(mesh.store, manifests, actor="test", now=SystemClock().now())
    world.sync_documents(mesh.engine, "example.org")


def _registered(mesh: Mesh) -> dict[str, str]:
    """Every sidecar of the world registered and synced; returns their documents."""
    docs = {k: v for k, v in mesh.store.document_digests().items() if not k.startswith("shard:")}
    for key in docs:
        mesh.engine.fire("sidecar", key, "register", {"owner": key})
    mesh.clock.advance(0.2)
    mesh.engine.tick()
    for key in docs:
        mesh.engine.fire("sidecar", key, "ack", {"generation": 1})
        assert mesh.state("sidecar", key) == "synced"
    return docs


def _published_after(mesh: Mesh, mark: int) -> set[str]:
    return {sidecar for sidecar, _ in mesh.publisher.history[mark:]}


def _change(manifests: list[dict[str, Any]], kind: str, edit: Any) -> dict[str, Any]:
    doc = copy.deepcopy(next(m for m in manifests if m["kind"] == kind))
    edit(doc["spec"])
    return doc


def test_a_change_of_inbound_policy_publishes_only_to_the_pods_it_applies_to(mesh: Mesh) -> None:
    manifests = topology.manifests()
    _apply(mesh, manifests)
    before = _registered(mesh)
    mark = len(mesh.publisher.history)

    limit = _change(manifests, "RateLimit", lambda spec: spec.update(rate="99r/s"))
    _apply(mesh, [limit])
    after = mesh.store.document_digests()
    changed = {k for k in before if after[k] != before[k]}
    mesh.clock.advance(0.2)
    mesh.engine.tick()

    assert changed and changed < set(before)  # some sidecars, not all
    assert _published_after(mesh, mark) == changed
    for key in set(before) - changed:
        assert mesh.state("sidecar", key) == "synced"
        assert mesh.row("sidecar", key).data["desired"] == 1


def test_a_change_of_one_trafficsplit_publishes_exactly_the_documents_that_changed(mesh: Mesh) -> None:
    manifests = topology.manifests()
    _apply(mesh, manifests)
    before = _registered(mesh)
    mark = len(mesh.publisher.history)

    split = _change(manifests, "TrafficSplit",
                    lambda spec: [b.update(weight=50) for b in spec["backends"]])
    _apply(mesh, [split])
    after = mesh.store.document_digests()
    changed = {k for k in before if after[k] != before[k]}
    mesh.clock.advance(0.2)
    mesh.engine.tick()

    # A split lives in its namespace's outbound shard, whose digest every document carries: every sidecar is sent
    # its new document (and acknowledges it once it has the shard); none is sent an unchanged one.
    assert _published_after(mesh, mark) == changed
    assert {k: mesh.row("sidecar", k).data["desired"] for k in changed} == dict.fromkeys(changed, 2)
    shards = {s: d for s, d in after.items() if s.startswith("shard:")}
    assert mesh.publisher.shards.keys() >= {s.removeprefix("shard:") for s in shards}


def test_an_apply_that_changes_nothing_writes_no_revision_and_publishes_nothing(mesh: Mesh) -> None:
    manifests = topology.manifests()
    _apply(mesh, manifests)
    _registered(mesh)
    revision, mark = mesh.store.world_revision(), len(mesh.publisher.history)
    result = world.apply(mesh.store, manifests, actor="test", now=SystemClock().now())
    assert result.revision == 0 and not result.created and not result.configured
    assert mesh.store.world_revision() == revision
    assert world.sync_documents(mesh.engine, "example.org").changed == frozenset()
    assert _published_after(mesh, mark) == set()
