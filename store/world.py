"""The world's tables: resources with their change log, and each sidecar's computed document.

A change of the world is one transaction: its change-log row (whose id is the new revision) and every resource it
writes or deletes, so a rejected or interrupted `meshctl apply` leaves the world as it was.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update

from store.records import Document, Resource, WorldChange
from store.schema import documents, resources, world_changes

_SLICE = 200


class WorldTables:
    """Mixed into `Store`: it provides the connections."""

    def _connect(self, *, autocommit: bool = False) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    # ---- resources -------------------------------------------------------------------------------------------
    def change_world(self, put: Sequence[Resource], remove: Sequence[tuple[str, str, str]], *, actor: str,
                     summary: str, at: datetime) -> int:
        """Write and delete resources as one change; returns the new world revision."""
        with self._transaction() as conn:
            revision = int(conn.execute(insert(world_changes).values(actor=actor, summary=summary, at=at)
                                        .returning(world_changes.c.id)).scalar_one())
            for r in put:
                values = {"api_version": r.api_version, "body": dict(r.body), "revision": revision, "updated_at": at}
                done = conn.execute(update(resources).where(*_ref_is(r.ref)).values(**values)).rowcount
                if not done:
                    conn.execute(insert(resources).values(kind=r.kind, namespace=r.namespace, name=r.name, **values))
            for ref in remove:
                conn.execute(delete(resources).where(*_ref_is(ref)))
        return revision

    def resources(self, kind: str | None = None, namespace: str | None = None) -> builtins.list[Resource]:
        query = select(resources).order_by(resources.c.kind, resources.c.namespace, resources.c.name)
        if kind is not None:
            query = query.where(resources.c.kind == kind)
        if namespace is not None:
            query = query.where(resources.c.namespace == namespace)
        with self._connect(autocommit=True) as conn:
            return [_resource(r) for r in conn.execute(query)]

    def resources_named(self, refs: Sequence[tuple[str, str, str]]) -> builtins.list[Resource]:
        found: builtins.list[Resource] = []
        with self._connect(autocommit=True) as conn:
            # In slices: SQLite refuses an expression tree of about a thousand ORs.
            for i in range(0, len(refs), _SLICE):
                query = select(resources).where(or_(*(and_(*_ref_is(ref)) for ref in refs[i:i + _SLICE])))
                found.extend(_resource(r) for r in conn.execute(query))
        return found

    def world_revision(self) -> int:
        with self._connect(autocommit=True) as conn:
            return int(conn.execute(select(func.coalesce(func.max(world_changes.c.id), 0))).scalar_one())

    def world_changes(self, after: int = 0, limit: int = 1000) -> builtins.list[WorldChange]:
        query = select(world_changes).where(world_changes.c.id > after).order_by(world_changes.c.id).limit(limit)
        with self._connect(autocommit=True) as conn:
            return [WorldChange(r.id, r.actor, r.summary, r.at) for r in conn.execute(query)]

    # ---- documents -------------------------------------------------------------------------------------------
    def put_documents(self, docs: Mapping[str, tuple[str, str]], remove: Sequence[str], *, revision: int,
                      at: datetime) -> None:
        """Store new or changed documents (sidecar -> (digest, body)) and forget removed ones, in one commit."""
        with self._transaction() as conn:
            for sidecar, (digest, body) in docs.items():
                values = {"digest": digest, "body": body, "revision": revision, "updated_at": at}
                done = conn.execute(update(documents).where(documents.c.sidecar == sidecar).values(**values)).rowcount
                if not done:
                    conn.execute(insert(documents).values(sidecar=sidecar, **values))
            if remove:
                conn.execute(delete(documents).where(documents.c.sidecar.in_(list(remove))))

    def document(self, sidecar: str) -> Document | None:
        with self._connect(autocommit=True) as conn:
            row = conn.execute(select(documents).where(documents.c.sidecar == sidecar)).first()
        return _document(row) if row is not None else None

    def documents(self, sidecars: Sequence[str]) -> dict[str, Document]:
        found: dict[str, Document] = {}
        with self._connect(autocommit=True) as conn:
            for i in range(0, len(sidecars), _SLICE):
                query = select(documents).where(documents.c.sidecar.in_(list(sidecars[i:i + _SLICE])))
                found.update((r.sidecar, _document(r)) for r in conn.execute(query))
        return found

    def document_digests(self) -> dict[str, str]:
        with self._connect(autocommit=True) as conn:
            return {r.sidecar: r.digest for r in conn.execute(select(documents.c.sidecar, documents.c.digest))}


def _ref_is(ref: tuple[str, str, str]) -> Iterator[Any]:
    kind, namespace, name = ref
    yield resources.c.kind == kind
    yield resources.c.namespace == namespace
    yield resources.c.name == name


def _resource(r: Any) -> Resource:
    return Resource(r.kind, r.namespace, r.name, r.api_version, r.body, r.revision, r.updated_at)


def _document(r: Any) -> Document:
    return Document(r.sidecar, r.digest, r.body, r.revision, r.updated_at)
