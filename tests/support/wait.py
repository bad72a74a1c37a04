"""Waiting for a condition in tests: poll it, with a bound that only a broken component ever reaches."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
BOUND = 30.0  # seconds; generous on two busy cores, and never a measurement of how long anything should take


def eventually(condition: Callable[[], T], what: str | Callable[[], str] = "the condition",
               within: float = BOUND, every: float = 0.02) -> T:
    """Poll `condition` until it returns something true, and return that; fail naming `what` (a text, or a function
    giving one at the time of failure) after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            text: Any = what() if callable(what) else what
            raise AssertionError(f"not within {within:g} s: {text}")
        time.sleep(every)
