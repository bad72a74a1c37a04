"""The control plane of one host, composed: the engine and its scheduler, the mesh CA, the node agent, the SVID vault,
NATS, and the world watcher. `meshctl up` runs one; tests and benchmarks build one on a temporary directory.

Theory of operation
-------------------
Everything a restart needs is in the state directory: the database (machines, journal, world, documents), the CA's
keys (`ca/`), the signed SVIDs not yet superseded (`svids/`), NATS's JetStream store (`nats/`). On start the engine
first runs what the previous process left in the outbox, then the node agent is given again every serving SVID and
the trust bundle (it keeps them in memory only), and the new NATS server every published sidecar's identity (its
permissions are otherwise granted at a publish), so workloads that kept running are served as before.

The node agent reports the first time it served a certificate to its workload; that is the certificate's `activate`
("picked up by the workload"). The world watcher reads the world's revision every `world_poll` seconds and, when it
moved, recomputes the documents and tells the rollouts whose document changed.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actions import Actions
from actions.ca import CaSettings, MeshCa, der_certificates
from actions.clock import Clock, SystemClock
from actions.errors import ActionError
from actions.meshnats import MeshNats
from actions.nats import ConfigPublisher, FakeConfigPublisher
from actions.nodeagent import NodeAgent, SvidMaterial
from actions.platform import FakePodPlatform, PodPlatform
from actions.vault import FileVault
from engine import world
from engine.core import Engine
from engine.executor import SERVING, bundled_generations, publish_shards
from engine.runtime import DEFAULT_WORKERS, Runner, ensure_ca
from machines import BadPayload, IllegalTrigger
from store import Store

log = logging.getLogger("meshloom.plane")

WORLD_POLL = 0.1  # seconds; reading one number, so a change of the world starts rolling out at once
RENEW_CHECK = 600.0  # seconds between checks of the control plane's own NATS certificate (it lives 24 h)


@dataclass
class PlaneConfig:
    state_dir: Path
    ca: CaSettings = field(default_factory=CaSettings)
    tick_seconds: float = 1.0
    world_poll: float = WORLD_POLL
    engine_settings: dict[str, Any] = field(default_factory=dict)
    nats_host: str = "127.0.0.1"  # where NATS listens for sidecars: a bridge address when pods are namespaces
    nats_port: int = 0  # 0: any free port (one host); Kubernetes: 4222, behind the Service sidecars dial
    nats_names: tuple[str, ...] = ()  # DNS names the server's certificate carries besides `localhost`
    agent_dir: Path | None = None  # the Workload API sockets; default <state_dir>/agent (pods on one host: /run)
    workers: int = DEFAULT_WORKERS  # threads running effects


class _Delivery:
    """The node agent, and NATS told of every new trust bundle (it verifies sidecars' certificates with it)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.nats: MeshNats | None = None

    def deliver(self, owner: str, material: SvidMaterial) -> None:
        self.agent.deliver(owner, material)

    def withdraw(self, owner: str, cert: str) -> None:
        self.agent.withdraw(owner, cert)

    def publish_bundle(self, trust_domain: str, roots: tuple[bytes, ...]) -> None:
        self.agent.publish_bundle(trust_domain, roots)
        if self.nats is not None:
            self.nats.trust(roots)


class ControlPlane:
    def __init__(self, store: Store, config: PlaneConfig, *, clock: Clock | None = None,
                 platform: PodPlatform | None = None, nats: bool = True) -> None:
        self.store, self.config = store, config
        self.clock = clock or SystemClock()
        state = config.state_dir
        self.trust_domain = config.ca.trust_domain
        self.ca = MeshCa(state / "ca", config.ca, self.clock)
        self.agent_dir = config.agent_dir or state / "agent"
        self.agent = NodeAgent(self.agent_dir, on_served=self._served)
        self.vault = FileVault(state / "svids")
        self.delivery = _Delivery(self.agent)
        self.with_nats = nats
        self.nats: MeshNats | None = None
        self.publisher: ConfigPublisher = FakeConfigPublisher()
        self.actions = Actions(self.ca, self.delivery, self.publisher, platform or FakePodPlatform(), self.vault)
        settings = {"trust_domain": self.trust_domain, "svid_ttl": config.ca.svid_ttl, "ca_ttl": config.ca.ca_ttl,
                    **config.engine_settings}
        self.engine = Engine(store, self.actions, self.clock, settings=settings)
        self.runner = Runner(self.engine, tick_seconds=config.tick_seconds, workers=config.workers)
        self._world_revision = -1
        self.recovered = 0
        self._running = False
        self._acks: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._ack_thread: threading.Thread | None = None

    # ---- life --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self.agent.start()
        ensure_ca(self.engine)
        roots = self.bundle()  # read once: nothing changes the CA generations before the workers start
        if self.with_nats:
            self.nats = MeshNats(self.ca, self.trust_domain, self.config.state_dir / "nats", roots, self._acked,
                                 host=self.config.nats_host, port=self.config.nats_port,
                                 server_names=self.config.nats_names)
            self.delivery.nats = self.nats
            self.publisher = self.nats
            try:
                self.nats.restore(self._published_documents())
            except (ActionError, ValueError):  # those sidecars get their permissions back at their next publish
                log.exception("granting the NATS permissions of the sidecars already published failed")
            self.actions = Actions(self.ca, self.delivery, self.publisher, self.actions.platform, self.vault)
            self.engine.actions = self.actions
            if self.nats.fresh:
                try:
                    self.republish()
                except (ActionError, ValueError):  # those sidecars read their documents at the next change
                    log.exception("publishing the documents again into a new NATS store failed")
        self._ack_thread = threading.Thread(target=self._commit_acks, name="meshloom-acks", daemon=True)
        self._ack_thread.start()
        self.redeliver(roots)  # before the workers start: what they deliver next is newer, and must win
        self.recovered = self.runner.start()
        self.sync_world()
        self.runner.scheduler.add_job(self.sync_world, "interval", seconds=self.config.world_poll,
                                      id="meshloom-world", max_instances=1, coalesce=True)
        if self.nats is not None:
            self.runner.scheduler.add_job(self._renew_nats, "interval", seconds=RENEW_CHECK, id="meshloom-nats-tls",
                                          max_instances=1, coalesce=True)

    def stop(self) -> None:
        """Stop everything this plane started; stopping twice is harmless."""
        if not self._running:
            return
        self._running = False  # the ack thread ends on it
        # The sources first (no more news comes in), then the engine (no more effects run), then what effects use.
        if self._ack_thread is not None:
            self._ack_thread.join(timeout=5)
        self.agent.stop()
        self.runner.stop()
        if self.nats is not None:
            self.nats.close()

    # ---- what a restart needs ------------------------------------------------------------------------------------
    def bundle(self) -> tuple[bytes, ...]:
        """The roots of the trust bundle as the CA generations make it up now."""
        gens = bundled_generations(self.store)
        return der_certificates(self.ca.trust_anchors(gens)) if gens else ()

    def republish(self) -> int:
        """Publish again, with the generation they were sent as, the documents (and their shards) an earlier NATS
        server held: a server that starts with an empty store (on Kubernetes, a new leader's pod) would otherwise
        leave a sidecar that restarts with nothing to read until its next change. A rollout with a newer
        generation on its way is left to publish it. Returns how many documents."""
        assert self.nats is not None
        sent = {r.key: int(r.data.get("sent", 0)) for r in self.store.list("sidecar")
                if r.state != "removed" and 0 < int(r.data.get("sent", 0)) == int(r.data.get("desired", 0))}
        docs = self.store.documents(sorted(sent))
        items = [(key, sent[key], doc.body.encode()) for key, doc in sorted(docs.items())]
        if items:
            publish_shards(self.engine, [doc.body for doc in docs.values()])
            self.nats.publish_many(items)
            log.info("published %d document(s) again into a new NATS store", len(items))
        return len(items)

    def redeliver(self, roots: tuple[bytes, ...]) -> int:
        """Give the node agent every serving SVID and the trust bundle (`roots`, as `bundle()` reads them) again;
        returns how many SVIDs."""
        if roots:
            self.agent.publish_bundle(self.trust_domain, roots)
        n = 0
        for cert in self.store.list("cert", states=SERVING):
            material = self.vault.get(cert.data["owner"], cert.key)
            if material is not None:
                self.agent.deliver(cert.data["owner"], material)
                n += 1
        return n

    def _published_documents(self) -> list[tuple[str, bytes]]:
        """Every sidecar still in the mesh with its document: whose NATS permissions a new server must grant."""
        keys = [r.key for r in self.store.list("sidecar") if r.state != "removed"]
        return [(key, doc.body.encode()) for key, doc in sorted(self.store.documents(keys).items())]

    # ---- feedback --------------------------------------------------------------------------------------------------
    def _served(self, owner: str, cert: str) -> None:
        self._fire("cert", cert, "activate", {}, "node-agent")

    def _acked(self, sidecar: str, generation: int) -> None:
        self._acks.put((sidecar, generation))

    def _commit_acks(self) -> None:
        """Acknowledgements arrive one by one; a thousand sidecars acknowledging one change are committed in a few
        transactions, not a thousand."""
        while self._running:
            try:
                first = self._acks.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < 1000:
                try:
                    batch.append(self._acks.get_nowait())
                except queue.Empty:
                    break
            latest: dict[str, int] = {}
            for sidecar, generation in batch:
                latest[sidecar] = max(generation, latest.get(sidecar, 0))
            try:
                self.engine.fire_many("sidecar", [(k, {"generation": g}) for k, g in latest.items()], "ack",
                                      actor=lambda key: f"sidecar:{key}")
                self.engine.drain()
            except Exception:
                log.exception("committing %d acknowledgement(s) failed", len(latest))

    def _fire(self, kind: str, key: str, trigger: str, payload: dict[str, Any], actor: str) -> None:
        try:
            self.engine.fire(kind, key, trigger, payload, actor=actor)
        except (IllegalTrigger, BadPayload) as exc:  # late or repeated news: the entity has moved on
            log.info("%s/%s %s ignored: %s", kind, key, trigger, exc)
        except Exception:
            log.exception("%s/%s %s failed", kind, key, trigger)

    def _renew_nats(self) -> None:
        try:
            if self.nats is not None and self.nats.renew_if_due(self.clock.now()):
                log.info("renewed the control plane's NATS certificate")
        except Exception:  # tried again at the next check, long before the certificate ends
            log.exception("renewing the control plane's NATS certificate failed")

    def sync_world(self) -> None:
        revision = self.store.world_revision()
        if revision == self._world_revision:
            return
        synced = world.sync_documents(self.engine, self.trust_domain)
        self._world_revision = synced.revision
        if synced.changed or synced.removed:
            log.info("world revision %d: %d document(s) changed, %d removed", synced.revision, len(synced.changed),
                     len(synced.removed))
