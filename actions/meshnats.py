"""The mesh's NATS: a server whose TLS comes from the mesh CA, the control plane's publisher, and permissions that
follow the sidecars.

The control plane has its own SVID (`spiffe://<trust-domain>/ns/meshloom/sa/control-plane`, DNS SAN `localhost`,
which clients verify the server by), used both as the server's certificate and as the publisher's client
certificate; its user may do everything. Each sidecar's permissions are added when its first document is published
(the document names its SPIFFE ID) and removed when its rollout is removed; the server reloads with SIGHUP, without a
restart. When the trust bundle changes (a CA rotation), the server's CA file is rewritten and reloaded the same way,
so sidecars holding leaves of either generation are accepted during the overlap.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from actions.ca import CertificateAuthority, pem
from actions.nats import NatsConfigPublisher, NatsServer, inbox_prefix

# The server and the control plane's client certificate live as long as this; `meshctl up` starting again makes
# new ones. (Rotating them while running is left to the certificate machine in a later change.)
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
                 on_ack: Callable[[str, int], None]) -> None:
        self.identity = control_plane_id(trust_domain)
        tls = workdir / "tls"
        tls.mkdir(parents=True, exist_ok=True, mode=0o700)
        issued = ca.sign_svid(self.identity, (SERVER_NAME,), CONTROL_PLANE_TTL)
        self.cert, self.key, self.bundle = tls / "control-plane.pem", tls / "control-plane.key", tls / "bundle.pem"
        _write(self.cert, pem([issued.certificate, *issued.chain]))
        _write(self.key, issued.private_key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        self._roots = roots
        _write(self.bundle, _pem_der(roots))
        self.server = NatsServer(workdir, cert=self.cert, key=self.key, ca=self.bundle, control_plane=self.identity)
        self.server.start()
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.bundle))
        ctx.load_cert_chain(self.cert, self.key)
        self.publisher = NatsConfigPublisher(self.server.url, ctx, on_ack, inbox=inbox_prefix(self.identity),
                                             tls_hostname=SERVER_NAME)
        self._lock = threading.Lock()
        self._identities: dict[str, str] = {}

    @property
    def url(self) -> str:
        return self.server.url

    def _permit(self, sidecar: str, identity: str | None) -> None:
        with self._lock:
            if self._identities.get(sidecar) == identity:
                return
            if identity is None:
                self._identities.pop(sidecar, None)
            else:
                self._identities[sidecar] = identity
            self.server.set_sidecars(self._identities)

    def publish(self, sidecar: str, generation: int, document: bytes) -> None:
        identity = json.loads(document).get("spiffeId")
        self._permit(sidecar, str(identity) if identity else None)
        self.publisher.publish(sidecar, generation, document)

    def publish_shard(self, namespace: str, body: bytes) -> None:
        self.publisher.publish_shard(namespace, body)

    def delete(self, sidecar: str) -> None:
        self.publisher.delete(sidecar)
        self._permit(sidecar, None)

    def delete_shard(self, namespace: str) -> None:
        self.publisher.delete_shard(namespace)

    def trust(self, roots: tuple[bytes, ...]) -> None:
        """The mesh's trust bundle changed: the server trusts exactly these roots from now on."""
        with self._lock:
            if roots == self._roots:
                return
            self._roots = roots
            _write(self.bundle, _pem_der(roots))
            self.server.reload()

    def close(self) -> None:
        self.publisher.close()
        self.server.stop()


def _pem_der(roots: tuple[bytes, ...]) -> bytes:
    from cryptography import x509

    return pem([x509.load_der_x509_certificate(r) for r in roots])
