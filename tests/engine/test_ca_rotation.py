"""A whole CA rotation through the engine, with the real mesh CA: at every step, workloads that hold leaves of the old
and of the new generation still complete mutual TLS with what the node agent serves them; at the end, the old root
is in no bundle.

OpenSSL checks validity on the wall clock, so the fake clock starts at the real "now"; it moves only to let the old
leaves expire, after the last handshake.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actions import Actions
from actions.ca import CaSettings, MeshCa, der_certificates
from actions.clock import FakeClock
from actions.nats import FakeConfigPublisher
from actions.nodeagent import FakeSvidDelivery
from actions.platform import FakePodPlatform
from actions.vault import FileVault
from engine import Engine, ensure_ca
from tests.engine.conftest import POLICY
from tests.support.documents import DocumentedStore
from tests.support.tls import Peer, mtls, refused_for_trust

WEB, API = "shop/web-1", "shop/api-1"


class World:
    def __init__(self, tmp: Path, url: str) -> None:
        self.tmp = tmp
        self.clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
        self.ca = MeshCa(tmp / "ca", CaSettings(), self.clock)
        self.delivery = FakeSvidDelivery()
        self.store = DocumentedStore(url)
        actions = Actions(self.ca, self.delivery, FakeConfigPublisher(), FakePodPlatform(), FileVault(tmp / "svids"))
        self.engine = Engine(self.store, actions, self.clock, policy=POLICY, jitter=lambda: 0.5)
        self.handshakes = 0

    def request(self, owner: str, *, drain: bool = True) -> None:
        sa = owner.split("/")[1].split("-")[0]
        self.engine.fire("cert", f"{owner}/1", "request",
                         {"owner": owner, "spiffe_id": f"spiffe://example.org/ns/shop/sa/{sa}",
                          "dns_names": [f"{sa}.shop.svc"], "index": 1}, drain=drain)

    def peer(self, owner: str) -> Peer:
        return Peer.served(self.delivery.material[owner], self.delivery.bundle)

    def generations_in_bundle(self) -> set[str]:
        known = [c.key for c in self.store.list("ca")]
        return {g for g in known if der_certificates(self.ca.trust_anchors((g,)))[0] in self.delivery.bundle}

    def both_ways_ok(self, a: Peer, b: Peer, step: str) -> None:
        for client, server in ((a, b), (b, a)):
            self.handshakes += 1
            h = mtls(self.tmp / "tls" / str(self.handshakes), client=client, server=server)
            assert h.ok, (step, h.client_error, h.server_error)


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    w = World(tmp_path, sqlite_url)
    yield w
    w.store.close()


def test_a_full_ca_rotation_keeps_old_and_new_leaves_talking_at_every_step_and_ends_with_the_old_root_gone(
        world: World) -> None:
    ensure_ca(world.engine)
    world.request(WEB)
    world.request(API)
    old_web = world.peer(WEB)
    assert world.generations_in_bundle() == {"1"}

    # Step by step: every effect of the rotation runs alone, and after each one the workloads' current SVIDs and
    # bundles are tried against each other, and against a workload still holding its first (old) leaf.
    world.engine.fire("ca", "2", "prepare", {"previous": "1", "auto_activate": True}, actor="cli:operator", drain=False)
    steps = 0
    while work := world.engine.discard_work():
        for pending in work:
            world.engine.run_effect(pending)
            steps += 1
            step = f"after {pending.effect} of {pending.kind}/{pending.key}"
            web, api = world.peer(WEB), world.peer(API)
            world.both_ways_ok(web, api, step)
            # A workload that has not yet picked up its new leaf still trusts, and is trusted by, the rotated ones.
            world.both_ways_ok(Peer(old_web.certs, old_web.key, web.bundle), api, step)
    assert steps > 10
    assert world.generations_in_bundle() == {"1", "2"}
    assert {world.store.get("cert", f"{o}/2").data["generation"] for o in (WEB, API)} == {"2"}  # type: ignore[union-attr]
    assert world.store.get("ca", "1").state == "retiring"  # type: ignore[union-attr]

    # Generation 1 retires once none of its leaves is outstanding: they were all replaced, so the next check says so.
    world.clock.advance(3600)
    world.engine.tick()
    assert world.store.get("ca", "1").state == "retired"  # type: ignore[union-attr]
    assert world.generations_in_bundle() == {"2"}
    new_web, api = world.peer(WEB), world.peer(API)
    world.both_ways_ok(new_web, api, "after retirement")
    stale = Peer(old_web.certs, old_web.key, new_web.bundle)
    assert refused_for_trust(mtls(world.tmp / "tls" / "stale", client=stale, server=api), by="server")
    reasons = [j.reason for j in world.store.journal("ca", "1")]
    assert reasons[-2:] == ["retiring", "retired"]


def test_the_vault_keeps_only_each_owners_newest_delivered_svid(world: World) -> None:
    ensure_ca(world.engine)
    world.request(WEB)
    world.engine.fire("cert", f"{WEB}/1", "rotate", actor="cli:operator")
    held = sorted(p.name for p in (world.tmp / "svids").rglob("*.json"))
    assert len(held) == 1 and held[0].endswith("2.json")
    assert world.delivery.current[WEB] == f"{WEB}/2"
    world.engine.fire("cert", f"{WEB}/2", "revoke", actor="platform")
    assert list((world.tmp / "svids").rglob("*.json")) == []


def test_a_signed_svid_lost_before_delivery_is_signed_again_after_the_retry_wait(world: World) -> None:
    ensure_ca(world.engine)
    world.request(WEB, drain=False)
    [sign] = world.engine.discard_work()
    world.engine.run_effect(sign)
    [deliver] = world.engine.discard_work()
    for path in (world.tmp / "svids").rglob("*.json"):  # the key was lost, as in a crash without the file
        path.unlink()
    world.engine.run_effect(deliver)
    assert world.store.get("cert", f"{WEB}/1").state == "failed"  # type: ignore[union-attr]
    world.clock.advance(timedelta(minutes=2).total_seconds())
    world.engine.tick()
    assert world.store.get("cert", f"{WEB}/1").state == "delivered"  # type: ignore[union-attr]


def test_a_certificate_revoked_while_its_signature_waited_is_never_signed_and_leaves_no_key(world: World) -> None:
    ensure_ca(world.engine)
    world.request(WEB, drain=False)
    [sign] = world.engine.discard_work()
    world.engine.fire("cert", f"{WEB}/1", "revoke", actor="platform")
    world.engine.run_effect(sign)
    assert world.store.get("cert", f"{WEB}/1").state == "revoked"  # type: ignore[union-attr]
    assert list((world.tmp / "svids").rglob("*.json")) == [] and world.store.pending_effects() == []
