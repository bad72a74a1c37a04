"""The composition root: event intake, the executor, the scheduler tick."""

from engine.core import Engine, Policy, Stats, TickReport, backoff
from engine.errors import Contention, EngineError, InvalidKey, UnknownEntity
from engine.runtime import RotationUnderWay, Runner, ensure_ca, start_ca_rotation

__all__ = ["Contention", "Engine", "EngineError", "InvalidKey", "Policy", "RotationUnderWay", "Runner", "Stats",
           "TickReport", "UnknownEntity", "backoff", "ensure_ca", "start_ca_rotation"]
