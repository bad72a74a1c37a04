"""The control plane of one host, for real: the engine on SQLite, the mesh CA, the node agent, NATS with mutual TLS,
and sidecars using the sidecar library with SVIDs from the mesh CA. Loopback only."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from actions.ca import pem
from actions.clock import SystemClock
from actions.meshnats import SERVER_NAME
from actions.nats import inbox_prefix
from engine import world
from engine.plane import ControlPlane, PlaneConfig
from sidecar.config import ConfigClient, tls_context
from store import Store, migrate, sqlite_url
from tests.catalog import topology
from tests.support.wait import eventually

pytestmark = pytest.mark.integration
WAIT = 30.0  # how long something broken may take to be noticed; not how long anything should take
WEB, DB = "shop/web-1", "shop/db-0"


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    url = sqlite_url(tmp_path)
    migrate.upgrade(url)
    store = Store(url)
    p = ControlPlane(store, PlaneConfig(tmp_path, tick_seconds=0.05, world_poll=0.05))
    p.start()
    yield p
    p.stop()
    store.close()


class Sidecar:
    """A sidecar's config client with an SVID from the mesh CA for its pod's identity."""

    def __init__(self, plane: ControlPlane, key: str, folder: Path) -> None:
        doc = plane.store.document(key)
        assert doc is not None
        self.spiffe_id = json.loads(doc.body)["spiffeId"]
        issued = plane.ca.sign_svid(self.spiffe_id, (f"{key.replace('/', '.')}.pod",), 3600)
        folder.mkdir(parents=True)
        (folder / "svid.pem").write_bytes(pem([issued.certificate, *issued.chain]))
        from cryptography.hazmat.primitives import serialization
        (folder / "key.pem").write_bytes(issued.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / "bundle.pem").write_bytes(plane.nats.bundle.read_bytes())  # type: ignore[union-attr]
        self.plane, self.key, self.folder = plane, key, folder
        self.applied: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.client: ConfigClient | None = None

    def start(self) -> None:
        ctx = tls_context(self.folder / "svid.pem", self.folder / "key.pem", self.folder / "bundle.pem")
        assert self.plane.nats is not None
        self.client = ConfigClient(self.plane.nats.url, self.key, ctx,
                                   lambda doc, shards: self.applied.append((doc, shards)),
                                   inbox_prefix(self.spiffe_id), tls_hostname=SERVER_NAME)
        self.client.start()

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()
            self.client = None


def status(plane: ControlPlane, key: str) -> tuple[str, int, int]:
    row = plane.store.get("sidecar", key)
    assert row is not None
    return row.state, int(row.data["desired"]), int(row.data["acked"])


def apply(plane: ControlPlane, manifests: list[dict[str, Any]]) -> None:
    world.apply(plane.store, manifests, actor="test", now=SystemClock().now())


def test_sidecars_get_their_documents_with_shards_over_mutual_tls_and_are_synced(plane, tmp_path):
    apply(plane, topology.manifests())
    eventually(lambda: plane.store.document(WEB) is not None, "the world was never rendered")
    sidecars = {k: Sidecar(plane, k, tmp_path / k.replace("/", "_")) for k in (WEB, DB)}
    for key, sidecar in sidecars.items():
        plane.engine.fire("sidecar", key, "register", {"owner": key}, actor="test")
        sidecar.start()
    try:
        for key, sidecar in sidecars.items():
            eventually(lambda k=key: status(plane, k)[0] == "synced", f"{key} never synced")
            doc, shards = sidecar.applied[-1]
            assert doc["sidecar"] == key and doc["spiffeId"] == sidecar.spiffe_id
            assert set(shards) == set(doc["outbound"]["shards"]) == {"shop", "pay", "legacy"}
            assert "api" in shards["shop"]["services"]
        assert [j.actor for j in plane.store.journal("sidecar", WEB)][-1] == f"sidecar:{WEB}"
    finally:
        for sidecar in sidecars.values():
            sidecar.stop()


def test_a_sidecar_offline_during_three_changes_gets_the_latest_when_it_reconnects_and_is_synced(plane, tmp_path):
    manifests = topology.manifests()
    apply(plane, manifests)
    eventually(lambda: plane.store.document(DB) is not None, "the world was never rendered")
    db = Sidecar(plane, DB, tmp_path / "db")
    plane.engine.fire("sidecar", DB, "register", {"owner": DB}, actor="test")
    db.start()
    eventually(lambda: status(plane, DB)[0] == "synced", "db-0 never synced")
    db.stop()
    first = status(plane, DB)[1]

    service = next(m for m in manifests if m["kind"] == "Service" and m["metadata"]["name"] == "db")
    for port in (5433, 5434, 5435):  # three changes of db's own Service while it is away
        changed = copy.deepcopy(service)
        changed["spec"]["ports"][0]["port"] = port
        apply(plane, [changed])
        eventually(lambda p=port: f'"port":{p}' in plane.store.document(DB).body,  # type: ignore[union-attr]
                   "db-0's document never changed")
    eventually(lambda: status(plane, DB)[1] >= first + 1, "no new generation for db-0")
    last = plane.store.document(DB)
    eventually(lambda: (row := plane.store.get("sidecar", DB)) is not None and row.state in ("sent", "stale")
               and row.data["sent"] == row.data["desired"] and plane.store.document(DB) == last,
               "db-0's latest document was never published")

    db.applied.clear()
    db.start()
    try:
        eventually(lambda: status(plane, DB)[0] == "synced" and status(plane, DB)[2] == status(plane, DB)[1],
                   "db-0 was not synced after it came back")
        # It applied the latest document only, never a replay of the ones it missed.
        assert db.applied and all([p["port"] for p in shards["shop"]["services"]["db"]["ports"]] == [5435]
                                  for _, shards in db.applied)
    finally:
        db.stop()



def test_a_workload_gets_its_svid_from_the_node_agent_and_a_rotation_is_pushed_and_picked_up(plane):
    from spiffe import X509Source

    from actions.nodeagent import endpoint_socket

    owner = "shop/web-1"
    socket = plane.agent.add_workload(owner)
    plane.engine.fire("cert", f"{owner}/1", "request",
                      {"owner": owner, "spiffe_id": "spiffe://example.org/ns/shop/sa/web",
                       "dns_names": ["web.shop.svc"], "index": 1}, actor="test")
    source = X509Source(socket_path=endpoint_socket(socket), timeout_in_seconds=WAIT)
    try:
        svid = source.get_x509_context().default_svid
        assert str(svid.spiffe_id) == "spiffe://example.org/ns/shop/sa/web"
        first = plane.store.get("cert", f"{owner}/1")
        assert first is not None and format(svid.leaf.serial_number, "x") == first.data["serial"]
        # The node agent said it served it: the certificate machine knows the workload picked it up.
        eventually(lambda: plane.store.get("cert", f"{owner}/1").state == "active",  # type: ignore[union-attr]
                   "the first certificate was never reported as picked up")

        plane.engine.fire("cert", f"{owner}/1", "rotate", actor="cli:operator")
        eventually(lambda: (c := plane.store.get("cert", f"{owner}/2")) is not None and "serial" in c.data
                   and format(source.get_x509_context().default_svid.leaf.serial_number, "x") == c.data["serial"],
                   "the rotated certificate never reached the workload's open stream")
        eventually(lambda: plane.store.get("cert", f"{owner}/2").state == "active",  # type: ignore[union-attr]
                   "the rotated certificate was never reported as picked up")
        assert plane.store.get("cert", f"{owner}/1").state == "superseded"  # type: ignore[union-attr]
    finally:
        source.close()


def test_a_restarted_control_plane_serves_every_svid_again_without_signing(plane, tmp_path):
    owner = "shop/db-0"
    plane.engine.fire("cert", f"{owner}/1", "request",
                      {"owner": owner, "spiffe_id": "spiffe://example.org/ns/shop/sa/db",
                       "dns_names": ["db.shop.svc"], "index": 1}, actor="test")
    serial = plane.store.get("cert", f"{owner}/1").data["serial"]  # type: ignore[union-attr]
    plane.stop()
    again = ControlPlane(plane.store, PlaneConfig(tmp_path, tick_seconds=0.05, world_poll=0.05))
    again.start()
    try:
        from spiffe import WorkloadApiClient

        from actions.nodeagent import endpoint_socket

        with WorkloadApiClient(endpoint_socket(again.agent.add_workload(owner))) as client:
            svid = client.fetch_x509_svid()
        assert format(svid.leaf.serial_number, "x") == serial
        assert [c.key for c in again.store.list("cert")] == [f"{owner}/1"]
    finally:
        again.stop()


def test_after_a_ca_rotation_a_sidecar_with_a_new_generation_svid_still_gets_its_configuration(plane, tmp_path):
    from engine import start_ca_rotation

    apply(plane, topology.manifests())
    eventually(lambda: plane.store.document(WEB) is not None, "the world was never rendered")
    start_ca_rotation(plane.engine)
    plane.engine.drain()  # as the control plane runs what `meshctl ca rotate` committed
    eventually(lambda: plane.ca.active == "2", "generation 2 never started signing")
    eventually(lambda: plane.store.get("ca", "1").state == "retiring", "generation 1 never retired")  # type: ignore[union-attr]
    # Its leaves were all replaced; its next check (a minute away) would say so: answer it now.
    plane.engine.fire("ca", "1", "checked", {"outstanding": 0}, actor="test")
    eventually(lambda: plane.store.get("ca", "1").state == "retired", "generation 1 never left the bundle")  # type: ignore[union-attr]

    # The control plane's own NATS client trusts exactly the new root now, not a retired one as well.
    assert plane.nats is not None
    trusted = plane.nats.publisher.ssl_context.get_ca_certs(binary_form=True)
    assert trusted == [plane.ca.trust_anchors(("2",))[0].public_bytes(Encoding.DER)]

    web = Sidecar(plane, WEB, tmp_path / "web")  # signed by generation 2, trusting only its root
    plane.engine.fire("sidecar", WEB, "register", {"owner": WEB}, actor="test")
    web.start()
    try:
        eventually(lambda: status(plane, WEB)[0] == "synced", "a sidecar of the new generation never synced")
    finally:
        web.stop()


def test_a_control_plane_whose_nats_store_is_new_publishes_every_synced_document_again(tmp_path):
    # On Kubernetes a new leader starts NATS in a pod of its own, with an empty JetStream store: a sidecar that
    # restarts then must still read its document, without waiting for the next change of the world.
    import shutil

    url = sqlite_url(tmp_path)
    migrate.upgrade(url)
    store = Store(url)
    config = PlaneConfig(tmp_path, tick_seconds=0.05, world_poll=0.05)
    first = ControlPlane(store, config)
    first.start()
    try:
        apply(first, topology.manifests())
        eventually(lambda: first.store.document(WEB) is not None, "the world was never rendered")
        first.engine.fire("sidecar", WEB, "register", {"owner": WEB}, actor="test")
        car = Sidecar(first, WEB, tmp_path / "web")
        car.start()
        eventually(lambda: status(first, WEB)[0] == "synced", "web never synced")
        generation = status(first, WEB)[1]
        car.stop()
    finally:
        first.stop()
    shutil.rmtree(tmp_path / "nats" / "jetstream")  # the new leader's pod: nothing of the old store

    second = ControlPlane(store, config)
    second.start()
    try:
        assert second.nats is not None and second.nats.fresh
        again = Sidecar(second, WEB, tmp_path / "web-again")
        again.start()
        eventually(lambda: bool(again.applied), "the restarted sidecar found nothing to read")
        doc, shards = again.applied[-1]
        assert doc["sidecar"] == WEB and set(shards) == {"shop", "pay", "legacy"}
        assert status(second, WEB) == ("synced", generation, generation)  # no new generation was needed
        again.stop()
    finally:
        second.stop()
        store.close()
