"""Scheduled rotation at scale, on the fake clock: ten cycles of 100 certificates under the signing rate limit."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import pytest

from actions import fake_actions
from actions.clock import FakeClock
from engine import Engine
from engine.throttle import SigningSchedule
from tests.engine.conftest import POLICY
from tests.engine.support import Mesh
from tests.support.documents import DocumentedStore

CERTS = 100
CYCLES = 10
TTL = 600.0  # half-life 300 s, rotation spread over 270-330 s by the jitter
RATE, BURST = 2.0, 5  # 100 certificates due within a minute need 50 s at 2/s: the limit bites every cycle


@pytest.fixture
def mesh(sqlite_url: str) -> Iterator[Mesh]:
    clock = FakeClock()
    actions = fake_actions(clock)
    store = DocumentedStore(sqlite_url)
    draws = random.Random(7)
    engine = Engine(store, actions, clock, policy=POLICY, jitter=draws.random,
                    settings={"svid_ttl": TTL, "signing_rate": RATE, "signing_burst": BURST})
    yield Mesh(engine, store, clock, actions)
    store.close()


def _request(mesh: Mesh, i: int) -> None:
    mesh.engine.fire("cert", f"ns/p{i:03}/1", "request",
                     {"owner": f"ns/p{i:03}", "spiffe_id": f"spiffe://example.org/ns/ns/sa/p{i:03}",
                      "dns_names": [f"p{i:03}.ns.svc"], "index": 1})


def test_ten_rotation_cycles_of_a_hundred_certificates_expire_none_and_keep_to_the_rate_limit(mesh: Mesh) -> None:
    mesh.ca_ready()
    for i in range(CERTS):
        _request(mesh, i)
    start = mesh.clock.now()
    first_signed = len(mesh.ca.issued)
    end = start + timedelta(seconds=TTL / 2 * CYCLES + TTL)
    while mesh.clock.now() < end:
        mesh.clock.advance(1.0)
        mesh.engine.tick()

    certs = mesh.store.list("cert")
    # Every owner rotated at least ten times, and nothing expired while in use.
    per_owner = Counter(c.data["owner"] for c in certs)
    assert len(per_owner) == CERTS and min(per_owner.values()) >= CYCLES + 1
    assert not [c.key for c in certs if c.state == "failed"]
    in_use_expiries = [j for c in certs for j in mesh.journal("cert", c.key) if j.reason == "expired-in-use"]
    assert in_use_expiries == []
    # Every rotation is journaled: each successor's predecessor went through rotation-due and superseded.
    for c in certs:
        if c.data.get("supersedes"):
            old = mesh.path("cert", c.data["supersedes"])
            assert old[:6] == ["requested", "issued", "delivered", "rotation-due", "superseded", "expired"][:len(old)]
            assert "rotation-due" in old and "superseded" in old
    # The jitter spreads the rotations: the first cycle's rotation times cover most of the window of +/-10% of the
    # half-life (60 s here), instead of all falling in the same second.
    first_rotation = sorted(
        next(j.at for j in mesh.journal("cert", f"ns/p{i:03}/1") if j.to_state == "rotation-due") for i in range(CERTS))
    assert (first_rotation[-1] - first_rotation[0]).total_seconds() > 0.8 * 0.2 * TTL / 2
    assert len(set(first_rotation)) > CERTS / 3
    # The rate limit holds: in any window of w seconds, at most RATE * w + BURST rotation signatures.
    rotations = sorted((i.not_before - start).total_seconds() for i in mesh.ca.issued[first_signed:])
    assert len(rotations) >= CERTS * CYCLES
    for w in (1, 5, 30):
        worst = max(sum(1 for t in rotations if s <= t < s + w) for s in rotations)
        assert worst <= RATE * w + BURST, (w, worst)
    # Waiting for the limit is not failing: no attempt was counted against any certificate.
    assert mesh.engine.stats.deferrals > 0 and mesh.engine.stats.failures == 0


def test_a_new_pods_first_certificate_does_not_wait_behind_a_rotation_backlog(mesh: Mesh) -> None:
    mesh.ca_ready()
    schedule = mesh.engine.signing
    assert schedule is not None
    for i in range(40):  # a backlog of 40 rotations at 2/s: 20 s of waiting
        assert schedule.wait(f"rotation-{i}") >= 0
    assert schedule.backlog > 30
    signed = len(mesh.ca.issued)
    _request(mesh, 999)
    assert len(mesh.ca.issued) == signed + 1
    assert mesh.state("cert", "ns/p999/1") == "delivered"


def test_the_signing_schedule_keeps_a_waiting_rotation_its_slot() -> None:
    clock = FakeClock()
    s = SigningSchedule(rate=1.0, burst=1, clock=clock)
    assert s.wait("a") == 0.0
    assert s.wait("b") == pytest.approx(1.0)
    assert s.wait("c") == pytest.approx(2.0)
    assert s.wait("b") == pytest.approx(1.0)  # asking again keeps b's slot, and charges nothing more
    clock.advance(1.0)
    assert s.wait("b") == 0.0
    assert s.wait("c") == pytest.approx(1.0)
    assert s.wait("d") == pytest.approx(2.0)
