"""The certificate authority: signs X.509-SVIDs and makes CA generations.

Theory of operation
-------------------
The engine decides *when* (a CA generation is prepared, activated, retired; an SVID is due); this module only *does*:
`generate` makes a generation's key and certificate, `activate` says which generation signs, `sign_svid` signs a
leaf with the active one, and `trust_anchors` answers which roots a peer must trust for a set of generations. What
a generation is (its key, certificate, chain and anchors) lives on disk, so a restarted controller signs with the
same keys; the scheduling lives in the engine's store. Nothing here reads the time except through the injected clock.

Two modes, as NGINX Service Mesh and SPIRE's "disk" upstream authority:
  self-signed  each generation is its own root: the bundle for generations {1, 2} is both roots, so leaves of 1
               and of 2 trust each other during a rotation, and dropping 1 from the bundle distrusts its leaves.
  upstream     each generation is an intermediate that the mesh mints and signs with an imported upstream key;
               its trust anchors are the upstream's root(s), so a generation rotation does not change the bundle
               (only a change of upstream does). A generation never outlives the upstream path above it.

On disk, under `directory` (created 0700; an existing directory's mode is left as it is):

    active                     the active generation's name (absent until the first generation)
    generations/               0700
      <generation>/            0700; built complete under a temporary name, then renamed into place
        key.pem                the generation's CA key, PKCS#8 PEM, mode 0600 from its creation
        cert.pem               its CA certificate
        chain.pem              certificates between it and its trust anchor (upstream intermediates); may be empty
        bundle.pem             its trust anchors (self-signed: cert.pem again; upstream: the upstream roots)

Every write is a temporary file (or directory) renamed into place, so a crash leaves the old state or the new one,
never half of either; leftover temporaries (names starting with ".") are ignored. A bad configuration is refused
with `CaConfigError` (one line, naming the flag or the file) before anything on disk changes.

`FakeCertificateAuthority` really signs too (an in-memory EC P-256 root per generation, leaves built by the same
code as the real CA), for tests of our own logic.
"""

from __future__ import annotations

import enum
import math
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from actions.clock import Clock
from actions.errors import PermanentError, TemporaryError

# A leaf's (or a generation's) own key: the key types the mesh makes.
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# What may sign a certificate: our keys, and whatever an imported upstream holds.
SigningKey: TypeAlias = CertificateIssuerPrivateKeyTypes


@dataclass(frozen=True, slots=True)
class Issued:
    serial: str  # hex
    generation: str
    not_before: datetime
    not_after: datetime
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # from the signer up to (excluding) the trust anchor; () when a root signs
    private_key: PrivateKey  # the leaf's key


@dataclass(frozen=True, slots=True)
class Generation:
    generation: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class CaGeneration:
    """One generation as `meshctl ca status` shows it."""

    generation: str
    kind: str  # "root" | "intermediate"
    subject: str
    issuer: str
    serial: str  # hex
    not_before: datetime
    not_after: datetime
    key_type: str
    active: bool


class CertificateAuthority(Protocol):
    def sign_svid(self, spiffe_id: str, dns_names: tuple[str, ...], ttl_seconds: float) -> Issued: ...

    def generate(self, generation: str, ttl_seconds: float) -> Generation: ...

    def activate(self, generation: str) -> None: ...

    def trust_anchors(self, generations: tuple[str, ...]) -> tuple[x509.Certificate, ...]: ...


# ---- settings ------------------------------------------------------------------------------------------------------
class KeyType(enum.StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_4096 = "rsa-4096"


@dataclass(frozen=True, slots=True)
class UpstreamFiles:
    """An imported CA, as SPIRE's "disk" upstream authority takes it.

    `cert`: PEM, the upstream CA certificate first, then any certificates up the chain towards its root.
    `key`: PEM, the private key of the first certificate (unencrypted).
    `bundle`: PEM, the root(s) the chain ends at; may be None only when the chain ends in a self-signed certificate.
    """

    cert: Path
    key: Path
    bundle: Path | None = None


# Why these floors. An SVID is renewed at half its life, moved earlier by up to 10 % of that half by jitter
# (machines/certificate.py), so the successor has at least 0.45 x TTL to be signed, delivered and picked up,
# including a failed signing and the default 60 s retry. At 5 minutes that is 135 s: one retry and a slow delivery
# still fit. Below it, a single hiccup expires certificates in use, and the 30 s backdate (clock skew between
# hosts) becomes a tenth of the life.
MIN_SVID_TTL = 5 * 60.0
# A generation must outlive, by a full SVID TTL, the last leaf signed at its half-life, or leaves signed late in its
# life are cut short (a leaf never outlives its signer): hence CA TTL > 2 x SVID TTL. One hour is the floor beside
# that, because every generation change pushes a new bundle to every sidecar and proxy (HAProxy `set ssl ca-file`)
# and waits for every old leaf to be replaced; minutes-long CAs would keep the mesh in a rotation all the time.
MIN_CA_TTL = 3600.0
DEFAULT_SVID_TTL = 3600.0  # 1 h, as NGINX Service Mesh
DEFAULT_CA_TTL = 720 * 3600.0  # 720 h, as NGINX Service Mesh
# Certificates start a little in the past, so that a peer whose clock is behind ours still accepts them at once.
LEAF_BACKDATE = timedelta(seconds=30)
CA_BACKDATE = timedelta(seconds=60)

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_GENERATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


class CaConfigError(ValueError):
    """A configuration the CA refuses: one line, naming the flag or the file, for the CLI to print as is."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def parse_duration(text: str, *, flag: str | None = None) -> float:
    """Seconds from "90s", "30m", "1h", "720h" or a sum such as "1h30m" (Go's units, as NGINX Service Mesh's flags)."""
    s = text.strip()
    parts = _DURATION_PART.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        where = f"{flag}: " if flag else ""
        raise CaConfigError(f"{where}{text!r} is not a duration (a number and a unit h, m or s: 90s, 30m, 1h, 720h)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """The inverse of `parse_duration` for whole seconds: 5400 -> "1h30m"."""
    if not math.isfinite(seconds) or seconds != int(seconds) or seconds < 0:
        return f"{seconds:g}s"
    rest, out = int(seconds), ""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out or "0s"


@dataclass(frozen=True, slots=True)
class CaSettings:
    """The CA's configuration; constructing one validates it (no file is read: `MeshCa` checks the upstream)."""

    trust_domain: str = "example.org"
    key_type: KeyType = KeyType.EC_P256
    svid_ttl: float = DEFAULT_SVID_TTL
    ca_ttl: float = DEFAULT_CA_TTL
    upstream: UpstreamFiles | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key_type, KeyType):  # a plain string from the command line
            object.__setattr__(self, "key_type", _key_type(str(self.key_type)))
        self.validate()

    @classmethod
    def from_flags(cls, *, trust_domain: str = "example.org", key_type: str = "ec-p256", svid_ttl: str = "1h",
                   ca_ttl: str = "720h", upstream_cert: Path | None = None, upstream_key: Path | None = None,
                   upstream_bundle: Path | None = None) -> CaSettings:
        """Settings from the command line's strings; every error names its flag."""
        if (upstream_cert is None) != (upstream_key is None):
            missing = "--upstream-key" if upstream_key is None else "--upstream-cert"
            raise CaConfigError(f"{missing}: an upstream CA needs both its certificate and its key")
        if upstream_bundle is not None and upstream_cert is None:
            raise CaConfigError("--upstream-bundle: given without --upstream-cert and --upstream-key")
        upstream = None
        if upstream_cert is not None and upstream_key is not None:
            upstream = UpstreamFiles(upstream_cert, upstream_key, upstream_bundle)
        return cls(trust_domain=trust_domain, key_type=_key_type(key_type),
                   svid_ttl=parse_duration(svid_ttl, flag="--svid-ttl"),
                   ca_ttl=parse_duration(ca_ttl, flag="--ca-ttl"), upstream=upstream)

    def validate(self) -> None:
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise CaConfigError(f"--trust-domain: {self.trust_domain!r} is not a SPIFFE trust domain (1 to 255 "
                                "lowercase letters, digits, '.', '-' or '_')")
        _key_type(str(self.key_type))
        if not math.isfinite(self.svid_ttl) or self.svid_ttl < MIN_SVID_TTL:
            raise CaConfigError(f"--svid-ttl: {format_duration(self.svid_ttl)} is below the minimum of "
                                f"{format_duration(MIN_SVID_TTL)} (an SVID is renewed at half its life, and its "
                                "successor needs time to be signed, delivered and retried)")
        if not math.isfinite(self.ca_ttl) or self.ca_ttl < MIN_CA_TTL:
            raise CaConfigError(f"--ca-ttl: {format_duration(self.ca_ttl)} is below the minimum of "
                                f"{format_duration(MIN_CA_TTL)}")
        if self.ca_ttl <= 2 * self.svid_ttl:
            raise CaConfigError(f"--ca-ttl: {format_duration(self.ca_ttl)} must exceed twice the SVID TTL "
                                f"({format_duration(2 * self.svid_ttl)}), or leaves signed late in a CA's life are "
                                "cut short")


def _key_type(text: str) -> KeyType:
    try:
        return KeyType(text)
    except ValueError:
        choices = ", ".join(k.value for k in KeyType)
        raise CaConfigError(f"--key-type: unknown key type {text!r} (choose {choices})") from None


# ---- certificates (pure: keys and times are given) -----------------------------------------------------------------
def new_key(key_type: KeyType) -> PrivateKey:
    match key_type:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case KeyType.RSA_4096:
            return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    raise AssertionError(key_type)


_Digest: TypeAlias = hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None


def _hash_for(key: SigningKey) -> _Digest:
    """The digest a signature by `key` uses: matched to the curve's strength; none for EdDSA (and ML-DSA), which
    hash the message themselves."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 384:
            return hashes.SHA512()
        if key.curve.key_size > 256:
            return hashes.SHA384()
        return hashes.SHA256()
    if isinstance(key, rsa.RSAPrivateKey | dsa.DSAPrivateKey):
        return hashes.SHA256()
    return None


def key_type_name(key: SigningKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, f"ec-{key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__.removesuffix("PrivateKey").lower()


def _organization(trust_domain: str) -> list[x509.NameAttribute[str]]:
    # The subject is for people reading certificates; identity is the URI SAN. X.520 caps O and CN at 64 characters.
    return [x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)] if len(trust_domain) <= 64 else []


_CA_KEY_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False)
_LEAF_KEY_USAGE = {
    False: x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False),
    # RSA key exchange (TLS 1.2 non-ECDHE suites) needs keyEncipherment; the SPIFFE spec allows it on leaves.
    True: x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                        encipher_only=False, decipher_only=False),
}
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def build_ca_certificate(*, generation: str, trust_domain: str, key: PrivateKey, not_before: datetime,
                         not_after: datetime, issuer: tuple[x509.Certificate, SigningKey] | None = None
                         ) -> x509.Certificate:
    """A generation's CA certificate: a root (issuer None) or an intermediate signed by an upstream.

    pathLenConstraint 0 either way: a generation signs only leaves. It carries the trust domain's SPIFFE ID
    (`spiffe://<trust-domain>`, no path), as the X.509-SVID spec recommends for signing certificates.
    """
    kind = "root" if issuer is None else "intermediate"
    subject = x509.Name([*_organization(trust_domain),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"Meshloom {kind} {generation}")])
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    signer: SigningKey
    if issuer is None:
        issuer_name, signer, aki = subject, key, x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    else:
        issuer_name, signer, aki = issuer[0].subject, issuer[1], _aki(issuer[0])
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(public)
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                       critical=False)
    )
    return builder.sign(signer, _hash_for(signer))


@dataclass(frozen=True, slots=True)
class _Signer:
    """What signing with one generation needs, computed once per generation rather than per leaf."""

    generation: str
    key: SigningKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # Issued.chain: this certificate (if not a root) and any above it
    anchors: tuple[x509.Certificate, ...]
    aki: x509.AuthorityKeyIdentifier = field(init=False)
    digest: _Digest = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "aki", _aki(self.certificate))
        object.__setattr__(self, "digest", _hash_for(self.key))

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def sign_leaf(self, *, spiffe_id: str, dns_names: Sequence[str], key: PrivateKey, trust_domain: str,
                  not_before: datetime, not_after: datetime) -> x509.Certificate:
        """An X.509-SVID: one URI SAN (the SPIFFE ID) plus DNS SANs, CA:false, digitalSignature, server+client auth."""
        public = key.public_key()
        cn = [x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])] if dns_names and len(dns_names[0]) <= 64 else []
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        sans += [x509.DNSName(d) for d in dns_names]
        subject = [*_organization(trust_domain), *cn]
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name(subject)).issuer_name(self.certificate.subject)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            # With an empty subject, RFC 5280 (and the SVID spec) want the SAN critical.
            .add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE[isinstance(key, rsa.RSAPrivateKey)], critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(self.aki, critical=False)
        )
        return builder.sign(self.key, self.digest)


# ---- validation of names -------------------------------------------------------------------------------------------
def _check_spiffe_id(spiffe_id: str, trust_domain: str) -> None:
    prefix = f"spiffe://{trust_domain}/"
    if not spiffe_id.startswith(prefix):
        raise PermanentError(f"{spiffe_id!r} is not a SPIFFE ID in the trust domain {trust_domain}")
    segments = spiffe_id[len(prefix):].split("/")
    if (len(spiffe_id.encode()) > 2048
            or any(s in (".", "..") or not _PATH_SEGMENT.fullmatch(s) for s in segments)):
        raise PermanentError(f"{spiffe_id!r} is not a valid SPIFFE ID (path segments of letters, digits, '.', '-', "
                             "'_', none empty, '.' or '..')")


def _check_dns_name(name: str) -> None:
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise PermanentError(f"{name!r} is not a DNS name")


def check_generation_name(generation: str) -> None:
    # It names a directory: no separators, no dot-files (temporaries), nothing a shell would mangle.
    if not _GENERATION.fullmatch(generation):
        raise PermanentError(f"{generation!r} is not a CA generation name (letters, digits, '.', '-', '_')")


# ---- reading PEM files ---------------------------------------------------------------------------------------------
def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _certificates(path: Path, *, allow_empty: bool = False) -> list[x509.Certificate]:
    data = _read(path)
    if allow_empty and not data.strip():
        return []
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CaConfigError(f"{path}: no PEM certificate in it")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CaConfigError(f"{path}: holds a malformed PEM certificate") from None


def _private_key(path: Path) -> SigningKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CaConfigError(f"{path}: the key is encrypted (give it unencrypted, readable only by the mesh)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CaConfigError(f"{path}: not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
                      | ed448.Ed448PrivateKey):
        raise CaConfigError(f"{path}: a {type(key).__name__} cannot sign certificates")
    return key


def _public_der(key: SigningKey | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return _issued_by(cert, cert)


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_signing_certificate(cert: x509.Certificate, path: Path, *, intermediates_below: int) -> None:
    """`cert` (from `path`) may sign a path with `intermediates_below` CA certificates under it."""
    bc = _basic_constraints(cert)
    if bc is None:
        raise CaConfigError(f"{path}: not a CA certificate (no basicConstraints extension)")
    if not bc.ca:
        raise CaConfigError(f"{path}: not a CA certificate (basicConstraints CA is false)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CaConfigError(f"{path}: the CA certificate may not sign certificates (keyUsage lacks keyCertSign)")
    if bc.path_length is not None and bc.path_length < intermediates_below:
        raise CaConfigError(f"{path}: pathLenConstraint {bc.path_length} of {cert.subject.rfc4514_string()} "
                            f"forbids the {intermediates_below} CA certificate(s) below it that the mesh needs")


# ---- the upstream CA -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Upstream:
    """An imported upstream CA, checked: it signs each generation's intermediate."""

    certificate: x509.Certificate
    key: SigningKey
    chain: tuple[x509.Certificate, ...]  # above `certificate`, excluding any self-signed root
    anchors: tuple[x509.Certificate, ...]  # the roots: the trust bundle of every generation it signs
    not_after: datetime  # the earliest expiry on the path from `certificate` up to its root


def load_upstream(files: UpstreamFiles, *, svid_ttl: float, now: datetime) -> Upstream:
    """Read and check an upstream CA; every error is a one-line `CaConfigError` naming the file at fault."""
    certs = _certificates(files.cert)
    key = _private_key(files.key)
    bundle = _certificates(files.bundle) if files.bundle is not None else []
    upstream = certs[0]
    _check_signing_certificate(upstream, files.cert, intermediates_below=1)
    if _public_der(key) != _public_der(upstream):
        raise CaConfigError(f"{files.key}: the key does not match the certificate {files.cert}")
    for i in range(1, len(certs)):
        if not _issued_by(certs[i - 1], certs[i]):
            raise CaConfigError(f"{files.cert}: certificate {i + 1} in the file did not issue certificate {i}")
        _check_signing_certificate(certs[i], files.cert, intermediates_below=i + 1)

    # The path: the file's certificates, then the bundle's root that issued the last one (unless it is a root).
    path: list[tuple[x509.Certificate, Path]] = [(c, files.cert) for c in certs]
    top = certs[-1]
    if _self_signed(top):
        anchors = [top, *bundle]
    else:
        if files.bundle is None:
            raise CaConfigError(f"{files.cert}: {top.subject.rfc4514_string()} is not self-signed, and no bundle "
                                "file names the root that issued it")
        root = next((r for r in bundle if _issued_by(top, r)), None)
        if root is None:
            raise CaConfigError(f"{files.bundle}: no certificate in it issued {top.subject.rfc4514_string()} "
                                f"from {files.cert}")
        _check_signing_certificate(root, files.bundle, intermediates_below=len(certs) + 1)
        path.append((root, files.bundle))
        anchors = bundle
    for cert, where in path:
        if cert.not_valid_after_utc <= now:
            raise CaConfigError(f"{where}: expired on {_iso(cert.not_valid_after_utc)}")
        if cert.not_valid_before_utc > now:
            raise CaConfigError(f"{where}: not valid before {_iso(cert.not_valid_before_utc)}")
    cert, where = min(path, key=lambda p: p[0].not_valid_after_utc)
    not_after = cert.not_valid_after_utc
    if not_after - now < timedelta(seconds=2 * svid_ttl):
        raise CaConfigError(f"{where}: expires on {_iso(not_after)}, sooner than twice the SVID TTL "
                            f"({format_duration(2 * svid_ttl)}) from now")
    chain = tuple(c for c in certs if not _self_signed(c))
    return Upstream(upstream, key, chain, tuple(_unique(anchors)), not_after)


def _unique(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    seen: set[bytes] = set()
    out = []
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            out.append(cert)
    return out


# ---- the directory -------------------------------------------------------------------------------------------------
KEY_FILE, CERT_FILE, CHAIN_FILE, BUNDLE_FILE = "key.pem", "cert.pem", "chain.pem", "bundle.pem"
ACTIVE_FILE = "active"
GENERATIONS = "generations"


def pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (a key is never briefly readable by others), write and sync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace `path`: a temporary file beside it, synced, renamed over it, the directory synced."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    try:
        _write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


class CaDirectory:
    """The on-disk state of the CA (see the module's docstring): reading it never changes it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generations = root / GENERATIONS

    def load(self, trust_domain: str | None) -> tuple[dict[str, _Signer], str | None]:
        """Every complete generation and the active one's name; CaConfigError naming the file at fault."""
        if not self.root.exists():
            return {}, None
        if not self.root.is_dir():
            raise CaConfigError(f"{self.root}: not a directory")
        signers: dict[str, _Signer] = {}
        try:
            entries = sorted(self.generations.iterdir()) if self.generations.exists() else []
        except OSError as exc:
            raise CaConfigError(f"{self.generations}: cannot be read ({exc.strerror or exc})") from None
        for entry in entries:
            if entry.name.startswith("."):  # a temporary a crash left behind
                continue
            signers[entry.name] = self._load_generation(entry, trust_domain)
        active = None
        active_file = self.root / ACTIVE_FILE
        if active_file.exists():
            active = _read(active_file).decode(errors="replace").strip()
            if active not in signers:
                raise CaConfigError(f"{active_file}: names generation {active!r}, which is not in {self.generations}")
        return signers, active

    def _load_generation(self, where: Path, trust_domain: str | None) -> _Signer:
        key_path = where / KEY_FILE
        try:
            mode = key_path.stat().st_mode
        except OSError as exc:
            raise CaConfigError(f"{key_path}: cannot be read ({exc.strerror or exc})") from None
        if mode & 0o077:
            raise CaConfigError(f"{key_path}: readable by other users (mode {mode & 0o777:04o}; it must be 0600)")
        key = _private_key(key_path)
        cert = _certificates(where / CERT_FILE)[0]
        if _public_der(key) != _public_der(cert):
            raise CaConfigError(f"{key_path}: the key does not match the certificate {where / CERT_FILE}")
        own = f"spiffe://{trust_domain}"
        ids = _uri_sans(cert)
        if trust_domain is not None and ids and ids != [own]:
            raise CaConfigError(f"--trust-domain: {trust_domain!r} differs from the trust domain of the CA "
                                f"generation in {where} ({', '.join(ids)})")
        chain = tuple(_certificates(where / CHAIN_FILE, allow_empty=True))
        anchors = tuple(_certificates(where / BUNDLE_FILE))
        own_chain = () if _self_signed(cert) else (cert, *chain)
        return _Signer(where.name, key, cert, own_chain, anchors)

    def create(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.generations.mkdir(mode=0o700, exist_ok=True)

    def write_generation(self, signer: _Signer) -> bool:
        """Put a generation in place whole; False when another writer got there first (its files stay)."""
        target = self.generations / signer.generation
        tmp = self.generations / f".{signer.generation}.{secrets.token_hex(6)}"
        os.mkdir(tmp, 0o700)
        try:
            _write_new(tmp / KEY_FILE, _key_pem(signer.key), 0o600)
            _write_new(tmp / CERT_FILE, pem([signer.certificate]), 0o644)
            _write_new(tmp / CHAIN_FILE, pem(signer.chain[1:]), 0o644)
            _write_new(tmp / BUNDLE_FILE, pem(signer.anchors), 0o644)
            _sync_dir(tmp)
            if target.exists():
                return False
            os.rename(tmp, target)
        except OSError:
            if target.exists():  # another process's generation got there first (EEXIST / ENOTEMPTY)
                return False
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _sync_dir(self.generations)
        return True

    def write_active(self, generation: str) -> None:
        _replace(self.root / ACTIVE_FILE, f"{generation}\n".encode(), 0o644)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


# ---- the mesh CA ---------------------------------------------------------------------------------------------------
class MeshCa:
    """The mesh's CA: generations on disk (self-signed roots, or intermediates under an upstream), SVIDs signed with
    the active one. Thread-safe: signing takes the active generation under a lock and signs outside it."""

    def __init__(self, directory: Path, settings: CaSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        # Everything that can refuse the configuration runs before the first write.
        settings.validate()
        self.upstream = (load_upstream(settings.upstream, svid_ttl=settings.svid_ttl, now=clock.now())
                         if settings.upstream is not None else None)
        self.directory = CaDirectory(directory)
        self._signers, self._active = self.directory.load(settings.trust_domain)
        try:
            self.directory.create()
        except OSError as exc:
            raise CaConfigError(f"{directory}: cannot be created ({exc.strerror or exc})") from None
        # `_lock` guards the in-memory view and is held only briefly, so signing never waits for a generation's
        # key to be made (seconds for RSA-4096); `_generating` keeps two `generate` calls from racing.
        self._lock = threading.Lock()
        self._generating = threading.Lock()

    # -- the Protocol -------------------------------------------------------------------------------------------
    def generate(self, generation: str, ttl_seconds: float) -> Generation:
        check_generation_name(generation)
        if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise PermanentError(f"CA generation {generation}: TTL must be a positive number of seconds")
        with self._generating:
            with self._lock:
                signer = self._signers.get(generation)
            if signer is None:
                signer = self._make(generation, ttl_seconds)
                try:
                    if not self.directory.write_generation(signer):  # another process made it: use theirs
                        signer = self._reload(generation)
                except OSError as exc:
                    raise TemporaryError(f"CA generation {generation} could not be saved: {exc}") from None
                with self._lock:
                    self._signers[generation] = signer
            with self._lock:
                if self._active is None:
                    self._set_active(generation)
        return Generation(generation, signer.not_before, signer.not_after)

    def activate(self, generation: str) -> None:
        with self._lock:
            signer = self._signers.get(generation)
            if signer is None:
                raise PermanentError(f"CA generation {generation} was never prepared")
            if signer.not_after <= self.clock.now():
                raise PermanentError(f"CA generation {generation} expired on {_iso(signer.not_after)}")
            self._set_active(generation)

    def sign_svid(self, spiffe_id: str, dns_names: tuple[str, ...], ttl_seconds: float) -> Issued:
        _check_spiffe_id(spiffe_id, self.settings.trust_domain)
        if not dns_names:
            # HAProxy silently drops `verify required` on a bind whose leaf has neither a DNS SAN nor a CN
            # (TESTBED.md), so no SVID leaves here without one.
            raise PermanentError(f"{spiffe_id}: every SVID must carry a DNS SAN, and none was given")
        for name in dns_names:
            _check_dns_name(name)
        if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise PermanentError(f"{spiffe_id}: TTL must be a positive number of seconds")
        with self._lock:
            if self._active is None:
                raise TemporaryError("no active CA generation yet")
            signer = self._signers[self._active]
        now = self.clock.now()
        if signer.not_after <= now:
            raise TemporaryError(f"the active CA generation {signer.generation} expired on "
                                 f"{_iso(signer.not_after)}; a new one must be activated")
        not_before = max(now - LEAF_BACKDATE, signer.not_before)
        not_after = min(now + timedelta(seconds=ttl_seconds), signer.not_after)  # a leaf never outlives its signer
        key = new_key(self.settings.key_type)
        cert = signer.sign_leaf(spiffe_id=spiffe_id, dns_names=dns_names, key=key,
                                trust_domain=self.settings.trust_domain, not_before=not_before, not_after=not_after)
        return Issued(format(cert.serial_number, "x"), signer.generation, cert.not_valid_before_utc,
                      cert.not_valid_after_utc, cert, signer.chain, key)

    def trust_anchors(self, generations: tuple[str, ...]) -> tuple[x509.Certificate, ...]:
        with self._lock:
            unknown = [g for g in generations if g not in self._signers]
            if unknown:
                raise PermanentError(f"unknown CA generation(s): {', '.join(unknown)}")
            return tuple(_unique(a for g in generations for a in self._signers[g].anchors))

    # -- views --------------------------------------------------------------------------------------------------
    def status(self) -> tuple[CaGeneration, ...]:
        with self._lock:
            signers, active = list(self._signers.values()), self._active
        return _status(signers, active)

    @property
    def active(self) -> str | None:
        with self._lock:
            return self._active

    # -- inside -------------------------------------------------------------------------------------------------
    def _make(self, generation: str, ttl_seconds: float) -> _Signer:
        now = self.clock.now()
        key = new_key(self.settings.key_type)
        not_after = now + timedelta(seconds=ttl_seconds)
        up = self.upstream
        if up is None:
            cert = build_ca_certificate(generation=generation, trust_domain=self.settings.trust_domain, key=key,
                                        not_before=now - CA_BACKDATE, not_after=not_after)
            return _Signer(generation, key, cert, (), (cert,))
        if up.not_after - now < timedelta(seconds=2 * self.settings.svid_ttl):
            # The same rule as at start (load_upstream): past it, every leaf would be cut short by its signer.
            raise PermanentError(f"the upstream CA expires on {_iso(up.not_after)}, sooner than twice the SVID TTL "
                                 "from now: import a new upstream CA")
        not_before = max(now - CA_BACKDATE, up.certificate.not_valid_before_utc)
        cert = build_ca_certificate(generation=generation, trust_domain=self.settings.trust_domain, key=key,
                                    not_before=not_before, not_after=min(not_after, up.not_after),
                                    issuer=(up.certificate, up.key))
        return _Signer(generation, key, cert, (cert, *up.chain), up.anchors)

    def _reload(self, generation: str) -> _Signer:
        try:
            signers, _ = self.directory.load(self.settings.trust_domain)
        except CaConfigError as exc:
            raise PermanentError(str(exc)) from None
        return signers[generation]

    def _set_active(self, generation: str) -> None:
        try:
            self.directory.write_active(generation)
        except OSError as exc:
            raise TemporaryError(f"the active CA generation could not be recorded: {exc}") from None
        self._active = generation


def _status(signers: Iterable[_Signer], active: str | None) -> tuple[CaGeneration, ...]:
    return tuple(
        CaGeneration(generation=s.generation, kind="root" if not s.chain else "intermediate",
                     subject=s.certificate.subject.rfc4514_string(),
                     issuer=s.certificate.issuer.rfc4514_string(),
                     serial=format(s.certificate.serial_number, "x"), not_before=s.not_before,
                     not_after=s.not_after, key_type=key_type_name(s.key), active=s.generation == active)
        for s in sorted(signers, key=lambda s: _natural(s.generation)))


def read_status(directory: Path) -> tuple[CaGeneration, ...]:
    """What a CA directory holds, read without changing it (for `meshctl ca status` beside a running CA)."""
    signers, active = CaDirectory(directory).load(None)
    return _status(signers.values(), active)


def _natural(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key: "2" before "10"."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


# ---- helpers for the Workload API and for tests --------------------------------------------------------------------
def svid_spiffe_id(cert: x509.Certificate) -> str:
    """The SPIFFE ID of an X.509-SVID: its one URI SAN (ValueError when there is not exactly one)."""
    uris = _uri_sans(cert)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise ValueError(f"not an X.509-SVID: URI SANs {uris}")
    return uris[0]


def svid_der(issued: Issued) -> tuple[bytes, bytes]:
    """The Workload API's wire form: the chain as concatenated DER (leaf first), and the key as PKCS#8 DER."""
    chain = b"".join(c.public_bytes(serialization.Encoding.DER) for c in (issued.certificate, *issued.chain))
    key = issued.private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
    return chain, key


def der_certificates(certs: Iterable[x509.Certificate]) -> tuple[bytes, ...]:
    """Each certificate's DER, as the node agent takes a chain (`Issued.certificate, *Issued.chain`) or a bundle."""
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)


# ---- the fake ------------------------------------------------------------------------------------------------------
class FakeCertificateAuthority:
    """Really signs, with EC P-256 keys held in memory; `fail_next` makes the next calls fail.

    Its leaves are built by the real CA's code, so they are valid X.509-SVIDs when given a DNS name; unlike the
    real CA it takes none (the engine's tests do not bother), and it neither backdates nor clamps validity.
    """

    def __init__(self, clock: Clock, trust_domain: str = "example.org") -> None:
        self.clock = clock
        self.trust_domain = trust_domain
        self._lock = threading.Lock()
        self._roots: dict[str, _Signer] = {}
        self._active: str | None = None
        self.issued: list[Issued] = []
        self.fail_next: list[Exception] = []

    def generate(self, generation: str, ttl_seconds: float) -> Generation:
        self._maybe_fail()
        with self._lock:
            if generation not in self._roots:
                key = ec.generate_private_key(ec.SECP256R1())
                now = self.clock.now()
                cert = build_ca_certificate(generation=generation, trust_domain=self.trust_domain, key=key,
                                            not_before=now - timedelta(minutes=1),
                                            not_after=now + timedelta(seconds=ttl_seconds))
                self._roots[generation] = _Signer(generation, key, cert, (), (cert,))
                if self._active is None:
                    self._active = generation
            signer = self._roots[generation]
        return Generation(generation, signer.not_before, signer.not_after)

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
            signer = self._roots[self._active]
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.clock.now()
        not_after = now + timedelta(seconds=ttl_seconds)
        cert = signer.sign_leaf(spiffe_id=spiffe_id, dns_names=dns_names, key=key, trust_domain=self.trust_domain,
                                not_before=now, not_after=not_after)
        issued = Issued(format(cert.serial_number, "x"), signer.generation, now, not_after, cert, (), key)
        with self._lock:
            self.issued.append(issued)
        return issued

    def trust_anchors(self, generations: tuple[str, ...]) -> tuple[x509.Certificate, ...]:
        with self._lock:
            unknown = [g for g in generations if g not in self._roots]
            if unknown:
                raise PermanentError(f"unknown CA generation(s): {', '.join(unknown)}")
            return tuple(_unique(self._roots[g].certificate for g in generations))

    def _maybe_fail(self) -> None:
        with self._lock:
            exc = self.fail_next.pop(0) if self.fail_next else None
        if exc is not None:
            raise exc
