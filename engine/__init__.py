"""The composition root: event intake, the executor, the scheduler tick."""

from engine.core import Engine, Policy, Stats, TickReport, backoff
from engine.errors import Contention, EngineError, InvalidKey, UnknownEntity
from engine.runtime import Runner, ensure_ca

__all__ = ["Contention", "Engine", "EngineError", "InvalidKey", "Policy", "Runner", "Stats", "TickReport",
           "UnknownEntity", "backoff", "ensure_ca"]
