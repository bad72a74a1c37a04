"""The engine's errors."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's own errors."""


class UnknownEntity(EngineError):
    def __init__(self, kind: str, key: str) -> None:
        super().__init__(f"{kind}/{key}: no such entity")
        self.kind, self.key = kind, key


class Contention(EngineError):
    def __init__(self, kind: str, key: str, rounds: int) -> None:
        super().__init__(f"{kind}/{key}: still changed by other writers after {rounds} retries")


class InvalidKey(EngineError):
    def __init__(self, kind: str, key: str, limit: int) -> None:
        shown = key if len(key) <= 60 else f"{key[:57]}..."
        super().__init__(f"{kind}/{shown}: a key must have 1 to {limit} characters (it has {len(key)})")
