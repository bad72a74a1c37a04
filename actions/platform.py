"""The platform pods run on: Kubernetes, or network namespaces on one host (later issues)."""

from __future__ import annotations

import threading
from typing import Protocol

from actions.errors import PermanentError


class PodPlatform(Protocol):
    def inject(self, pod: str) -> None: ...

    def teardown(self, pod: str) -> None: ...


class FakePodPlatform:
    """Records injected pods; `refuse` holds pods whose injection fails for good."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.injected: set[str] = set()
        self.torn_down: set[str] = set()
        self.refuse: set[str] = set()

    def inject(self, pod: str) -> None:
        if pod in self.refuse:
            raise PermanentError(f"pod {pod}: injection refused")
        with self._lock:
            self.injected.add(pod)

    def teardown(self, pod: str) -> None:
        with self._lock:
            self.injected.discard(pod)
            self.torn_down.add(pod)
