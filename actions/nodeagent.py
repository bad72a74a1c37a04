"""Delivery of SVIDs and trust bundles to the node agents that serve workloads.

The Workload API server itself arrives with the identity issue; this is the engine's side of it.
"""

from __future__ import annotations

import threading
from typing import Protocol

from actions.errors import TemporaryError


class SvidDelivery(Protocol):
    def deliver(self, owner: str, cert: str) -> None: ...

    def withdraw(self, owner: str, cert: str) -> None: ...

    def publish_bundle(self, generations: tuple[str, ...]) -> None: ...


class FakeSvidDelivery:
    """Keeps what a node agent would serve: each owner's current certificate and the trust bundle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: dict[str, str] = {}
        self.delivered: list[tuple[str, str]] = []
        self.bundle: tuple[str, ...] = ()
        self.down = False

    def deliver(self, owner: str, cert: str) -> None:
        if self.down:
            raise TemporaryError("node agent unreachable")
        with self._lock:
            self.current[owner] = cert
            self.delivered.append((owner, cert))

    def withdraw(self, owner: str, cert: str) -> None:
        with self._lock:
            if self.current.get(owner) == cert:
                del self.current[owner]

    def publish_bundle(self, generations: tuple[str, ...]) -> None:
        with self._lock:
            self.bundle = generations
