"""Mutual TLS between two workloads, with Python's ssl module over a socket pair: who completes the handshake, and
whom each side sees."""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from actions.ca import Issued, pem, svid_spiffe_id
from actions.nodeagent import SvidMaterial


@dataclass
class Peer:
    """A workload's TLS side: its SVID (leaf first, then intermediates), its key, and the bundle it trusts."""

    certs: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    bundle: tuple[x509.Certificate, ...]

    @classmethod
    def of(cls, issued: Issued, bundle: tuple[x509.Certificate, ...]) -> Peer:
        return cls((issued.certificate, *issued.chain), issued.private_key, bundle)

    @classmethod
    def served(cls, material: SvidMaterial, roots: tuple[bytes, ...]) -> Peer:
        """What a node agent serves a workload: its SVID material and the trust bundle's roots, both DER."""
        return cls(tuple(x509.load_der_x509_certificate(c) for c in material.chain),
                   serialization.load_der_private_key(material.key, None),
                   tuple(x509.load_der_x509_certificate(r) for r in roots))


def _context(folder: Path, name: str, peer: Peer, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # peers are authorised by SPIFFE ID (the URI SAN), read after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # the certificates must pass OpenSSL's strict RFC 5280 checks
    folder.mkdir(parents=True, exist_ok=True)
    cert_file = folder / f"{name}.pem"
    cert_file.write_bytes(pem(peer.certs))
    key_file = folder / f"{name}.key"
    key_file.touch(mode=0o600)
    assert hasattr(peer.key, "private_bytes")
    key_file.write_bytes(peer.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cadata=pem(peer.bundle).decode())
    return ctx


@dataclass
class Handshake:
    client_saw: str | None = None  # the server's SPIFFE ID, as the client read it
    server_saw: str | None = None
    client_error: BaseException | None = None
    server_error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None


def mtls(folder: Path, client: Peer, server: Peer) -> Handshake:
    """A client and a server complete a mutual-TLS handshake over a socket pair and exchange a byte each way."""
    client_ctx = _context(folder, "client", client, server=False)
    server_ctx = _context(folder, "server", server, server=True)
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    out = Handshake()

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                out.server_saw = svid_spiffe_id(x509.load_der_x509_certificate(der))
                assert tls.recv(4) == b"ping"
                tls.sendall(b"pong")
        except (OSError, AssertionError) as exc:
            out.server_error = exc
        finally:
            b.close()

    server_thread = threading.Thread(target=serve)
    server_thread.start()
    try:
        # TLS 1.3: the client's handshake ends before the server has judged the client's certificate; a refusal
        # reaches the client as an alert on its first read, hence the ping-pong.
        with client_ctx.wrap_socket(a) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            out.client_saw = svid_spiffe_id(x509.load_der_x509_certificate(der))
            tls.sendall(b"ping")
            if tls.recv(4) != b"pong":
                raise ConnectionError("the server closed without answering")
    except OSError as exc:
        out.client_error = exc
    finally:
        a.close()
        server_thread.join(timeout=10)
    assert not server_thread.is_alive()
    return out


def refused_for_trust(h: Handshake, *, by: str) -> bool:
    """The side `by` refused the other's certificate as untrusted, and the connection did not go through."""
    error = h.server_error if by == "server" else h.client_error
    return (isinstance(error, ssl.SSLCertVerificationError) and "unable to get local issuer certificate" in str(error)
            and h.client_error is not None)
