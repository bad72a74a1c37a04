"""A mesh for engine tests: a real SQLite store, the fake clock, the behaving fake actions, and small drivers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from actions import Actions
from actions.ca import FakeCertificateAuthority, der_certificates
from actions.clock import FakeClock
from actions.nats import FakeConfigPublisher
from actions.nodeagent import FakeSvidDelivery
from actions.platform import FakePodPlatform
from engine import Engine, ensure_ca
from store import Entity, JournalEntry, PendingEffect, Store

POD = "default/web-1"


@dataclass
class Mesh:
    engine: Engine
    store: Store
    clock: FakeClock
    actions: Actions

    # The fakes, typed as what they are.
    @property
    def ca(self) -> FakeCertificateAuthority:
        assert isinstance(self.actions.ca, FakeCertificateAuthority)
        return self.actions.ca

    @property
    def delivery(self) -> FakeSvidDelivery:
        assert isinstance(self.actions.delivery, FakeSvidDelivery)
        return self.actions.delivery

    @property
    def publisher(self) -> FakeConfigPublisher:
        assert isinstance(self.actions.publisher, FakeConfigPublisher)
        return self.actions.publisher

    @property
    def platform(self) -> FakePodPlatform:
        assert isinstance(self.actions.platform, FakePodPlatform)
        return self.actions.platform

    def bundle(self) -> tuple[str, ...]:
        """The CA generations whose roots the node agent's trust bundle holds."""
        held = set(self.delivery.bundle)
        return tuple(sorted(c.key for c in self.store.list("ca")
                            if der_certificates(self.ca.trust_anchors((c.key,)))[0] in held))

    def row(self, kind: str, key: str) -> Entity:
        entity = self.store.get(kind, key)
        assert entity is not None, f"{kind}/{key} does not exist"
        return entity

    def state(self, kind: str, key: str) -> str:
        return self.row(kind, key).state

    def journal(self, kind: str, key: str) -> list[JournalEntry]:
        return self.store.journal(kind, key)

    def path(self, kind: str, key: str) -> list[str]:
        return [j.to_state for j in self.journal(kind, key)]

    def outbox(self, kind: str | None = None, key: str | None = None) -> list[PendingEffect]:
        return self.store.pending_effects(kind, key)

    def advance_to(self, moment: datetime) -> None:
        self.clock.set(moment)

    def ca_ready(self) -> None:
        ensure_ca(self.engine)
        assert self.state("ca", "1") == "active"

    def ready_pod(self, key: str = POD) -> None:
        """Admit a pod and walk it to ready, as the platform, the sidecar and the proxy would."""
        e = self.engine
        e.fire("pod", key, "admit", {"service_account": "web"}, actor="platform")
        e.fire("pod", key, "schedule", {"node": "node-a", "ip": "10.0.0.7"}, actor="platform")
        e.fire("pod", key, "sidecar_connected", actor="sidecar")
        self.clock.advance(0.1)  # the coalescing window of the sidecar's first document
        e.tick()
        e.fire("sidecar", key, "ack", {"generation": 1}, actor="sidecar")
        e.fire("pod", key, "ready", actor="sidecar")
        assert self.state("pod", key) == "ready"
