"""The certificate authority: signs X.509-SVIDs and makes CA generations.

The Protocol is what the engine needs; `FakeCertificateAuthority` is a CA that really signs (an in-memory EC P-256
root per generation), for tests of our own logic. The mesh CA proper (keys on disk, upstream roots, key types)
arrives with the identity issue.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from actions.clock import Clock
from actions.errors import PermanentError, TemporaryError


@dataclass(frozen=True, slots=True)
class Issued:
    serial: str
    generation: str
    not_before: datetime
    not_after: datetime
    certificate: x509.Certificate


@dataclass(frozen=True, slots=True)
class Generation:
    generation: str
    not_before: datetime
    not_after: datetime


class CertificateAuthority(Protocol):
    def sign_svid(self, spiffe_id: str, dns_names: tuple[str, ...], ttl_seconds: float) -> Issued: ...

    def generate(self, generation: str, ttl_seconds: float) -> Generation: ...

    def activate(self, generation: str) -> None: ...


class FakeCertificateAuthority:
    """Really signs, with EC P-256 keys held in memory; `fail_next` makes the next calls fail."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._roots: dict[str, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]] = {}
        self._active: str | None = None
        self.issued: list[Issued] = []
        self.fail_next: list[Exception] = []

    def generate(self, generation: str, ttl_seconds: float) -> Generation:
        self._maybe_fail()
        with self._lock:
            if generation not in self._roots:
                key = ec.generate_private_key(ec.SECP256R1())
                now = self.clock.now()
                name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshloom fake root {generation}")])
                cert = (
                    x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(seconds=ttl_seconds))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .sign(key, hashes.SHA256())
                )
                self._roots[generation] = (key, cert)
                if self._active is None:
                    self._active = generation
            cert = self._roots[generation][1]
        return Generation(generation, cert.not_valid_before_utc, cert.not_valid_after_utc)

    def activate(self, generation: str) -> None:
        with self._lock:
            if generation not in self._roots:
                raise PermanentError(f"CA generation {generation} was never prepared")
            self._active = generation

    def sign_svid(self, spiffe_id: str, dns_names: tuple[str, ...], ttl_seconds: float) -> Issued:
        self._maybe_fail()
        with self._lock:
            if self._active is None:
                raise TemporaryError("no active CA generation yet")
            generation = self._active
            ca_key, ca_cert = self._roots[generation]
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.clock.now()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        sans += [x509.DNSName(d) for d in dns_names]
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(seconds=ttl_seconds))
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        issued = Issued(format(cert.serial_number, "x"), generation, now, now + timedelta(seconds=ttl_seconds), cert)
        with self._lock:
            self.issued.append(issued)
        return issued

    def _maybe_fail(self) -> None:
        with self._lock:
            exc = self.fail_next.pop(0) if self.fail_next else None
        if exc is not None:
            raise exc
