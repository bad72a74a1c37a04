"""The signing rate limit, as a schedule of slots on the injected clock (the generic cell rate algorithm).

Each rotation asks for a slot: the theoretical arrival time moves on by 1/rate per signature, and a signature may
run up to `burst` slots early. A rotation whose slot is later is told when to come back, and its slot is kept for it
under its certificate's key, so it is not charged twice and the backlog drains at exactly `rate`: no retry storm. A
new pod's first certificate is never made to wait, but it takes a slot too, pushing the rotations behind it back.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

from actions.clock import Clock


class SigningSchedule:
    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a signing rate limit needs rate > 0 and burst >= 1")
        self.rate, self.burst, self.clock = rate, burst, clock
        self._interval = timedelta(seconds=1 / rate)
        self._tolerance = self._interval * (burst - 1)
        self._tat: datetime = clock.now()  # when the next slot is, were nobody early
        self._held: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def wait(self, who: str) -> float:
        """0.0 if `who` may sign now, else the seconds until its slot (kept for it)."""
        with self._lock:
            now = self.clock.now()
            slot = self._held.get(who)
            if slot is None:
                slot = max(now, self._tat - self._tolerance)
                self._tat = max(self._tat, now) + self._interval
            if slot <= now:
                self._held.pop(who, None)
                return 0.0
            self._held[who] = slot
            return (slot - now).total_seconds()

    def take_now(self) -> None:
        """Sign without waiting, and count it: a new pod's first certificate."""
        with self._lock:
            self._tat = max(self._tat, self.clock.now()) + self._interval

    @property
    def backlog(self) -> int:
        with self._lock:
            return len(self._held)
