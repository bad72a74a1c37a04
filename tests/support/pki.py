"""A tiny PKI for tests: a self-signed root, intermediates, and leaf X.509-SVIDs as the Workload API serves them.

Leaves follow the X.509-SVID rules that the py-spiffe client enforces (one `spiffe://` URI SAN, not a CA,
digitalSignature, no keyCertSign or cRLSign) and carry a DNS SAN as the mesh's SVIDs do. Keys are EC P-256,
the mesh's default key type. Everything is DER, the Workload API's wire encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_CA_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
_LEAF_USAGE = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                            encipher_only=False, decipher_only=False)


@dataclass(frozen=True, slots=True)
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[bytes, ...]  # DER, leaf first, then the intermediates up to (not including) the root

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def key_der(self) -> bytes:
        """The private key as unencrypted PKCS#8 DER."""
        return self.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc


@dataclass(frozen=True, slots=True)
class Authority:
    """A signing CA: a root (`Authority.root`) or an intermediate under another authority (`intermediate`)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[bytes, ...] = ()  # DER of this authority and the intermediates above it, root excluded: () for a root

    @classmethod
    def root(cls, name: str = "meshloom test root", ttl: timedelta = timedelta(days=1)) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def intermediate(self, name: str = "meshloom test intermediate") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(
            x509.CertificateBuilder().subject_name(_name(name)).public_key(key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_USAGE, critical=True),
            self.cert.not_valid_after_utc - datetime.now(UTC),
        )
        return Authority(cert, key, (cert.public_bytes(serialization.Encoding.DER), *self.chain))

    def leaf(self, spiffe_id: str, dns_name: str = "workload.local", ttl: timedelta = timedelta(hours=1)) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(
            x509.CertificateBuilder().subject_name(_name(dns_name)).public_key(key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id),
                                                        x509.DNSName(dns_name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False),
            ttl,
        )
        return Leaf(cert, key, (cert.public_bytes(serialization.Encoding.DER), *self.chain))

    def _sign(self, builder: x509.CertificateBuilder, ttl: timedelta) -> x509.Certificate:
        now = datetime.now(UTC)
        return (
            builder.issuer_name(self.cert.subject).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + ttl)
            .sign(self.key, hashes.SHA256())
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
