"""A small PKI for NATS tests and benchmarks: a root, a server certificate and client SVIDs, as PEM files.

EC P-256 throughout, as the mesh defaults to. The server certificate names `localhost` and 127.0.0.1. A client SVID
carries the SPIFFE URI SAN `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` and a DNS SAN, as the mesh's SVIDs do: the
DNS SAN is there so the tests show it does NOT decide the NATS user (users are named after SPIFFE IDs only).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "example.org"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Svid(KeyPair):
    spiffe_id: str
    ca: Path

    def context(self) -> ssl.SSLContext:
        """A client context trusting the test root and presenting this SVID."""
        return client_context(self.ca, self)


def spiffe_id(ns: str, sa: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"


def client_context(ca: Path, pair: KeyPair | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshloom tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestPki:
    """A root in `folder` (created on construction); each call writes a new key pair there."""

    __test__ = False  # a helper, not a test class

    def __init__(self, folder: Path, trust_domain: str = TRUST_DOMAIN) -> None:
        self.folder = folder
        self.trust_domain = trust_domain
        folder.mkdir(parents=True, exist_ok=True)
        self._now = datetime.now(UTC) - timedelta(minutes=5)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = _name("meshloom test root")
        self._root = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now).not_valid_after(self._now + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = folder / "ca.pem"
        self.ca.write_bytes(self._root.public_bytes(serialization.Encoding.PEM))

    def _issue(self, stem: str, common_name: str, sans: list[x509.GeneralName],
               usage: x509.ObjectIdentifier) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self._root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now).not_valid_after(self._now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        pair = KeyPair(self.folder / f"{stem}.pem", self.folder / f"{stem}-key.pem")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.touch(mode=0o600)
        pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return pair

    def server(self, stem: str = "server") -> KeyPair:
        """The NATS server's certificate: DNS `localhost` and IP 127.0.0.1."""
        return self._issue(stem, "nats", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                           ExtendedKeyUsageOID.SERVER_AUTH)

    def svid(self, ns: str, sa: str, *, dns_name: str | None = None, stem: str | None = None) -> Svid:
        """A client SVID for `ns`/`sa`: URI SAN first, then a DNS SAN (`<sa>.<ns>.svc` unless given)."""
        sid = spiffe_id(ns, sa, self.trust_domain)
        stem = stem or f"svid-{ns}-{sa}"
        pair = self._issue(stem, sa, [x509.UniformResourceIdentifier(sid), x509.DNSName(dns_name or f"{sa}.{ns}.svc")],
                           ExtendedKeyUsageOID.CLIENT_AUTH)
        return Svid(pair.cert, pair.key, sid, self.ca)
