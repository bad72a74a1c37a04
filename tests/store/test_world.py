"""The world's tables: a change is all or nothing, and each change is a revision with its actor."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from store import Resource, Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def svc(name: str, port: int = 80) -> Resource:
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"ports": [{"port": port}]}}
    return Resource("service", "default", name, "v1", body)


def test_a_change_writes_its_resources_and_becomes_the_new_revision(store: Store) -> None:
    assert store.world_revision() == 0
    rev = store.change_world([svc("web"), svc("api")], [], actor="cli:alice", summary="apply 2", at=T0)
    assert store.world_revision() == rev > 0
    assert [r.name for r in store.resources("service")] == ["api", "web"]
    assert all(r.revision == rev for r in store.resources())
    [change] = store.world_changes()
    assert (change.revision, change.actor, change.summary) == (rev, "cli:alice", "apply 2")


def test_a_resource_written_again_is_replaced_not_duplicated(store: Store) -> None:
    store.change_world([svc("web", 80)], [], actor="a", summary="s", at=T0)
    rev = store.change_world([svc("web", 8080)], [], actor="a", summary="s", at=T0)
    [web] = store.resources("service")
    assert web.body["spec"]["ports"] == [{"port": 8080}] and web.revision == rev


def test_a_deleted_resource_is_gone_and_others_stay(store: Store) -> None:
    store.change_world([svc("web"), svc("api")], [], actor="a", summary="s", at=T0)
    store.change_world([], [("service", "default", "web")], actor="a", summary="s", at=T0)
    assert [r.name for r in store.resources()] == ["api"]
    assert store.resources_named([("service", "default", "api"), ("service", "default", "web")])[0].name == "api"


def test_a_change_that_fails_midway_leaves_the_world_as_it_was(store: Store) -> None:
    store.change_world([svc("web")], [], actor="a", summary="s", at=T0)
    before = store.world_revision()
    unstorable = Resource("service", "default", "x" * 300, "v1", {})  # longer than the name column on PostgreSQL
    bad = Resource("service", "default", "bad", "v1", {"not json": object()})
    with pytest.raises(Exception):  # noqa: B017 - the database's own error, whatever it is
        store.change_world([svc("api"), unstorable, bad], [("service", "default", "web")], actor="a",
                           summary="s", at=T0)
    assert store.world_revision() == before
    assert [r.name for r in store.resources()] == ["web"]


def test_documents_are_stored_replaced_and_forgotten(store: Store) -> None:
    store.put_documents({"ns/a": ("d1", "{}"), "ns/b": ("d2", "{}")}, [], revision=1, at=T0)
    store.put_documents({"ns/a": ("d3", '{"x":1}')}, ["ns/b"], revision=2, at=T0)
    assert store.document_digests() == {"ns/a": "d3"}
    doc = store.document("ns/a")
    assert doc is not None and (doc.body, doc.revision) == ('{"x":1}', 2)
    assert store.document("ns/b") is None


def test_thousands_of_resources_are_written_and_found_by_name_at_once(store: Store) -> None:
    many = [svc(f"s{i}") for i in range(2500)]
    store.change_world(many, [], actor="a", summary="s", at=T0)
    found = store.resources_named([r.ref for r in many])
    assert len(found) == 2500
