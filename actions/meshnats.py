"""The mesh's NATS: a server whose TLS comes from the mesh CA, the control plane's publisher, and permissions that
follow the sidecars.

The control plane has its own SVID (`spiffe://<trust-domain>/ns/meshloom/sa/control-plane`, DNS SAN `localhost`,
which clients verify the server by, plus the names it is reached by elsewhere: on Kubernetes the sidecars dial the
Service `meshloom-nats.<namespace>.svc` and verify that name), used both as the server's certificate and as the
publisher's client certificate; its user may do everything. The publisher itself always dials the server on
loopback and verifies `localhost`. Each sidecar's permissions are added when its first document is published
(the document names its SPIFFE ID) and removed when its rollout is removed; the server reloads with SIGHUP, without a
restart. When the trust bundle changes (a CA rotation), the server's CA file is rewritten and reloaded the same way,
so sidecars holding leaves of either generation are accepted during the overlap.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from actions.ca import CertificateAuthority, pem
from actions.nats import NatsConfigPublisher, NatsServer, inbox_prefix

# The server's and the control plane's certificate (one SVID) lives this long and is renewed at half its life
# (`renew_if_due`, from the control plane's scheduler), as workload SVIDs are.
CONTROL_PLANE_TTL = 24 * 3600.0
SERVER_NAME = "localhost"


def control_plane_id(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/ns/meshloom/sa/control-plane"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class MeshNats:
    """A `ConfigPublisher` over the mesh's own NATS server."""

    def __init__(self, ca: CertificateAuthority, trust_domain: str, workdir: Path, roots: tuple[bytes, ...],
                 on_ack: Callable[[str, int], None], *, host: str = "127.0.0.1", port: int = 0,
                 server_names: tuple[str, ...] = ()) -> None:
        self.identity = control_plane_id(trust_domain)
        # `localhost` first (it becomes the CN; the publisher verifies it), then the names sidecars dial.
        self.server_names = (SERVER_NAME, *(n for n in dict.fromkeys(server_names) if n != SERVER_NAME))
        self._ca = ca
        self._lock = threading.Lock()
        tls = workdir / "tls"
        tls.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cert, self.key, self.bundle = tls / "control-plane.pem", tls / "control-plane.key", tls / "bundle.pem"
        self.not_before, self.not_after = self._issue()
        self._roots = roots
        _write(self.bundle, _pem_der(roots))
        self.server = NatsServer(workdir, cert=self.cert, key=self.key, ca=self.bundle, control_plane=self.identity,
                                 host=host, port=port)
        # Whether this server starts with an empty JetStream store (a first start, or on Kubernetes a new leader's
        # pod): then nothing an earlier server published is there for sidecars to read.
        store = workdir / "jetstream"
        self.fresh = not store.is_dir() or not any(store.iterdir())
        self.server.start()
        self.publisher = NatsConfigPublisher(self.server.url, self._context(), on_ack,
                                             inbox=inbox_prefix(self.identity), tls_hostname=SERVER_NAME)
        self._identities: dict[str, str] = {}

    def _issue(self) -> tuple[datetime, datetime]:
        issued = self._ca.sign_svid(self.identity, self.server_names, CONTROL_PLANE_TTL)
        _write(self.cert, pem([issued.certificate, *issued.chain]))
        _write(self.key, issued.private_key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        return issued.not_before, issued.not_after

    def _context(self) -> ssl.SSLContext:
        """The publisher's TLS: the control plane's SVID, and exactly the roots of the current bundle (a fresh
        context each time: a context can only ever add trusted roots, never drop a retired one)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.bundle))
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def renew_if_due(self, now: datetime) -> bool:
        """Past half its life, the control plane's SVID is signed again: the server reloads it, and the publisher's
        next connection presents it. True when it was renewed."""
        with self._lock:
            if now < self.not_before + (self.not_after - self.not_before) / 2:
                return False
            validity = self._issue()
            self.server.reload()
            self.publisher.use_tls(self._context())
            self.not_before, self.not_after = validity  # only once in force: a failed reload is tried again
            return True

    @property
    def url(self) -> str:
        return self.server.url

    def _permit(self, grants: dict[str, str | None]) -> None:
        """Sidecars' identities (None: gone); one reload for all the changes, none when nothing changed."""
        with self._lock:
            changed = False
            for sidecar, identity in grants.items():
                if self._identities.get(sidecar) == identity:
                    continue
                changed = True
                if identity is None:
                    self._identities.pop(sidecar, None)
                else:
                    self._identities[sidecar] = identity
            if changed:
                self.server.set_sidecars(self._identities)

    def publish(self, sidecar: str, generation: int, document: bytes) -> None:
        self.publish_many([(sidecar, generation, document)])

    def publish_many(self, items: Iterable[tuple[str, int, bytes]]) -> None:
        batch = list(items)
        self._permit({sidecar: _identity(document) for sidecar, _, document in batch})
        self.publisher.publish_many(batch)

    def restore(self, documents: Iterable[tuple[str, bytes]]) -> None:
        """Grant again, in one reload, the permissions of sidecars whose documents an earlier server published (this
        process restarted, or another replica led before): the server starts knowing only the control plane, and
        these sidecars must not be locked out until their next change."""
        self._permit({sidecar: _identity(document) for sidecar, document in documents})

    def has_shard(self, namespace: str, digest: str) -> bool:
        return self.publisher.has_shard(namespace, digest)

    def publish_shard(self, namespace: str, body: bytes) -> None:
        self.publisher.publish_shard(namespace, body)

    def delete(self, sidecar: str) -> None:
        self.publisher.delete(sidecar)
        self._permit({sidecar: None})

    def delete_shard(self, namespace: str) -> None:
        self.publisher.delete_shard(namespace)

    def trust(self, roots: tuple[bytes, ...]) -> None:
        """The mesh's trust bundle changed (a CA rotation): the server trusts exactly these roots from now on, and
        its certificate is signed again by the generation that signs now, so that sidecars which trust only the new
        root still trust the server once the old one has left."""
        with self._lock:
            if roots == self._roots:
                return
            _write(self.bundle, _pem_der(roots))
            validity = self._issue()
            self.server.reload()
            self.publisher.use_tls(self._context())
            # Only once in force: a failed attempt leaves them unchanged, so the effect's retry tries again.
            self._roots = roots
            self.not_before, self.not_after = validity

    def close(self) -> None:
        try:
            self.publisher.close()
        finally:
            self.server.stop()


def _identity(document: bytes) -> str | None:
    value = json.loads(document).get("spiffeId")
    return str(value) if value else None


def _pem_der(roots: tuple[bytes, ...]) -> bytes:
    from cryptography import x509

    return pem([x509.load_der_x509_certificate(r) for r in roots])
