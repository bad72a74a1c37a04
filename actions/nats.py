"""Publishing each sidecar's configuration. The NATS implementation arrives with the configuration issue."""

from __future__ import annotations

import threading
from typing import Protocol

from actions.errors import TemporaryError


class ConfigPublisher(Protocol):
    def publish(self, sidecar: str, generation: int) -> None: ...

    def delete(self, sidecar: str) -> None: ...


class FakeConfigPublisher:
    """Remembers the last published generation per sidecar; `down` makes publishing fail as a lost server would."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.published: dict[str, int] = {}
        self.history: list[tuple[str, int]] = []
        self.down = False

    def publish(self, sidecar: str, generation: int) -> None:
        if self.down:
            raise TemporaryError("NATS unreachable")
        with self._lock:
            self.published[sidecar] = generation
            self.history.append((sidecar, generation))

    def delete(self, sidecar: str) -> None:
        with self._lock:
            self.published.pop(sidecar, None)
