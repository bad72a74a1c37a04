"""The mesh CA: real keys on disk, real SVIDs that py-spiffe and OpenSSL accept, and one-line refusals.

Time is a FakeClock. Where OpenSSL checks validity (the TLS handshakes) it uses the wall clock, so those tests start
the fake clock at the real "now" and never advance it.
"""

from __future__ import annotations

import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from spiffe import X509Svid

from actions.ca import (
    MIN_CA_TTL,
    MIN_SVID_TTL,
    CaConfigError,
    CaSettings,
    FakeCertificateAuthority,
    Issued,
    KeyType,
    MeshCa,
    UpstreamFiles,
    der_certificates,
    format_duration,
    parse_duration,
    pem,
    svid_der,
    svid_spiffe_id,
)
from actions.clock import FakeClock
from actions.errors import PermanentError, TemporaryError
from tests.support.tls import Peer, mtls, refused_for_trust

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = 3600.0
CA_TTL = 720 * HOUR
WEB = "spiffe://example.org/ns/shop/sa/web"
API = "spiffe://example.org/ns/shop/sa/api"


# ---- helpers -------------------------------------------------------------------------------------------------------
def verify(issued: Issued, anchors: tuple[x509.Certificate, ...], at: datetime) -> list[x509.Certificate]:
    """RFC 5280 path validation (cryptography's verifier, as a TLS server checks a client): the validated chain."""
    verifier = PolicyBuilder().store(Store(list(anchors))).time(at).build_client_verifier()
    return verifier.verify(issued.certificate, list(issued.chain)).chain


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under `root` with its mode and, for files, its bytes."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, path.read_bytes() if path.is_file() else None)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_ca_cert(name: str, *, key: ec.EllipticCurvePrivateKey | None = None,
                 issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None, ca: bool = True,
                 not_before: datetime, not_after: datetime, path_length: int | None = None,
                 ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An upstream PKI certificate as an organisation's own CA would make it."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corp"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    issuer_public = key.public_key() if issuer is None else issuer[1].public_key()
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
    )
    return builder.sign(signer, hashes.SHA256()), key


def write_pem(path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    out = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            out += item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    path.write_bytes(out)
    return path


@dataclass
class UpstreamPki:
    files: UpstreamFiles
    root: x509.Certificate


def self_signed_upstream(folder: Path, start: datetime, *, days: float = 3650, name: str = "Corp Root"
                         ) -> UpstreamPki:
    folder.mkdir(parents=True, exist_ok=True)
    root, key = make_ca_cert(name, not_before=start - timedelta(days=1), not_after=start + timedelta(days=days))
    files = UpstreamFiles(write_pem(folder / "up.pem", root), write_pem(folder / "up.key", key), None)
    return UpstreamPki(files, root)


def intermediate_upstream(folder: Path, start: datetime) -> tuple[UpstreamPki, x509.Certificate]:
    """An upstream that is itself an intermediate: its root is only in the bundle file."""
    folder.mkdir(parents=True, exist_ok=True)
    root = make_ca_cert("Corp Root", not_before=start - timedelta(days=1), not_after=start + timedelta(days=3650))
    inter = make_ca_cert("Corp Mesh Issuing", issuer=root, not_before=start - timedelta(days=1),
                         not_after=start + timedelta(days=365), path_length=1)
    files = UpstreamFiles(write_pem(folder / "up.pem", inter[0]), write_pem(folder / "up.key", inter[1]),
                          write_pem(folder / "bundle.pem", root[0]))
    return UpstreamPki(files, root[0]), inter[0]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> MeshCa:
    mesh_ca = MeshCa(tmp_path / "ca", CaSettings(), clock)
    mesh_ca.generate("1", CA_TTL)
    return mesh_ca


# ---- SVIDs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key_type", list(KeyType))
def test_every_key_type_signs_an_svid_that_py_spiffe_accepts_and_that_verifies_to_its_root(
        tmp_path: Path, clock: FakeClock, key_type: KeyType):
    ca = MeshCa(tmp_path / "ca", CaSettings(key_type=key_type), clock)
    ca.generate("1", CA_TTL)
    issued = ca.sign_svid(WEB, ("web.shop.pod", "web.shop.svc.cluster.local"), HOUR)

    svid = X509Svid.parse_raw(*svid_der(issued))
    assert str(svid.spiffe_id) == WEB
    assert issued.chain == ()  # the root signs
    assert verify(issued, ca.trust_anchors(("1",)), clock.now())[-1] == ca.trust_anchors(("1",))[0]

    leaf = issued.certificate
    expected_key = {KeyType.EC_P256: (ec.EllipticCurvePrivateKey, 256),
                    KeyType.EC_P384: (ec.EllipticCurvePrivateKey, 384),
                    KeyType.RSA_2048: (rsa.RSAPrivateKey, 2048), KeyType.RSA_4096: (rsa.RSAPrivateKey, 4096)}
    key_class, size = expected_key[key_type]
    assert isinstance(issued.private_key, key_class) and issued.private_key.key_size == size
    assert ca.status()[0].key_type == key_type.value
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert usage.value.key_encipherment == key_type.value.startswith("rsa")
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def test_a_leaf_has_one_uri_san_its_dns_names_no_ca_flag_and_key_identifiers(ca: MeshCa):
    issued = ca.sign_svid(WEB, ("web.shop.pod",), HOUR)
    leaf = issued.certificate
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert san.get_values_for_type(x509.DNSName) == ["web.shop.pod"]
    assert svid_spiffe_id(leaf) == WEB
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    root = ca.trust_anchors(("1",))[0]
    assert (leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
            == root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest)
    assert issued.serial == format(leaf.serial_number, "x")
    assert issued.generation == "1"


def test_serials_are_random_and_every_leaf_has_its_own_key(ca: MeshCa):
    leaves = [ca.sign_svid(WEB, ("web.shop.pod",), HOUR) for _ in range(20)]
    assert len({i.serial for i in leaves}) == 20
    assert len({i.certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
                 for i in leaves}) == 20


def test_an_svid_without_a_dns_name_is_refused_for_good(ca: MeshCa):
    with pytest.raises(PermanentError, match="DNS SAN"):
        ca.sign_svid(WEB, (), HOUR)


@pytest.mark.parametrize("spiffe_id", [
    "spiffe://other.org/ns/shop/sa/web",  # another trust domain
    "spiffe://example.org",  # no path: a trust domain's own ID is for signing certificates only
    "spiffe://example.org/",
    "spiffe://example.org/ns//web",
    "spiffe://example.org/ns/../web",
    "spiffe://example.org/ns/shop?x=1",
    "https://example.org/ns/shop/sa/web",
])
def test_a_malformed_spiffe_id_or_one_outside_the_trust_domain_is_refused(ca: MeshCa, spiffe_id: str):
    with pytest.raises(PermanentError):
        ca.sign_svid(spiffe_id, ("web.shop.pod",), HOUR)


@pytest.mark.parametrize("dns_name", ["", "web..pod", "-web.pod", "web_1.pod", "a" * 64 + ".pod", "web.pod/x"])
def test_a_malformed_dns_name_is_refused(ca: MeshCa, dns_name: str):
    with pytest.raises(PermanentError, match="not a DNS name"):
        ca.sign_svid(WEB, (dns_name,), HOUR)


def test_a_leaf_starts_slightly_in_the_past_and_never_outlives_its_generation(tmp_path: Path, clock: FakeClock):
    ca = MeshCa(tmp_path / "ca", CaSettings(svid_ttl=HOUR, ca_ttl=3 * HOUR), clock)
    gen = ca.generate("1", 3 * HOUR)
    assert gen.not_after == T0 + timedelta(hours=3)
    clock.advance(HOUR)
    early = ca.sign_svid(WEB, ("web.shop.pod",), HOUR)
    assert early.not_before == clock.now() - timedelta(seconds=30)
    assert early.not_after == clock.now() + timedelta(hours=1)
    clock.advance(1.5 * HOUR)
    late = ca.sign_svid(WEB, ("web.shop.pod",), HOUR)
    assert late.not_after == gen.not_after  # cut to its signer's end, not an hour
    assert late.certificate.not_valid_after_utc == late.not_after
    clock.advance(HOUR)
    with pytest.raises(TemporaryError, match="expired"):
        ca.sign_svid(WEB, ("web.shop.pod",), HOUR)


def test_signing_before_any_generation_exists_is_worth_retrying(tmp_path: Path, clock: FakeClock):
    ca = MeshCa(tmp_path / "ca", CaSettings(), clock)
    with pytest.raises(TemporaryError, match="no active CA generation"):
        ca.sign_svid(WEB, ("web.shop.pod",), HOUR)


def test_signing_from_many_threads_gives_distinct_valid_leaves_while_generations_change(ca: MeshCa,
                                                                                          clock: FakeClock):
    results: list[Issued] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def sign() -> None:
        try:
            mine = [ca.sign_svid(WEB, ("web.shop.pod",), HOUR) for _ in range(40)]
        except BaseException as exc:  # reported below, so a failure in a thread fails the test
            errors.append(exc)
            return
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=sign) for _ in range(6)]
    for t in threads:
        t.start()
    ca.generate("2", CA_TTL)
    ca.activate("2")
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len({i.serial for i in results}) == 240
    anchors = ca.trust_anchors(("1", "2"))
    for issued in results:
        verify(issued, anchors, clock.now())


# ---- generations ---------------------------------------------------------------------------------------------------
def test_generate_is_idempotent_and_the_first_generation_becomes_active(tmp_path: Path, clock: FakeClock):
    ca = MeshCa(tmp_path / "ca", CaSettings(), clock)
    first = ca.generate("1", CA_TTL)
    key_file = tmp_path / "ca" / "generations" / "1" / "key.pem"
    key_before = key_file.read_bytes()
    clock.advance(60)
    assert ca.generate("1", 2 * CA_TTL) == first
    assert key_file.read_bytes() == key_before
    ca.generate("2", CA_TTL)
    assert ca.active == "1"  # a later generation waits to be activated
    assert ca.sign_svid(WEB, ("web.shop.pod",), HOUR).generation == "1"
    ca.activate("2")
    assert ca.sign_svid(WEB, ("web.shop.pod",), HOUR).generation == "2"
    assert (tmp_path / "ca" / "active").read_text() == "2\n"


def test_activating_an_unknown_generation_is_a_permanent_error(ca: MeshCa):
    with pytest.raises(PermanentError, match="never prepared"):
        ca.activate("7")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden", "x" * 65])
def test_a_generation_name_that_is_not_a_plain_file_name_is_refused(ca: MeshCa, name: str):
    with pytest.raises(PermanentError, match="not a CA generation name"):
        ca.generate(name, CA_TTL)


def test_the_key_is_0600_its_folders_0700_and_keys_survive_a_new_mesh_ca_on_the_same_directory(
        tmp_path: Path, clock: FakeClock):
    directory = tmp_path / "ca"
    ca = MeshCa(directory, CaSettings(), clock)
    ca.generate("1", CA_TTL)
    ca.generate("2", CA_TTL)
    ca.activate("2")
    assert mode(directory) == 0o700
    assert mode(directory / "generations") == 0o700
    for gen in ("1", "2"):
        assert mode(directory / "generations" / gen) == 0o700
        assert mode(directory / "generations" / gen / "key.pem") == 0o600
        assert (directory / "generations" / gen / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    before = snapshot(directory)

    again = MeshCa(directory, CaSettings(), clock)
    assert again.status() == ca.status()
    assert again.active == "2"
    assert again.trust_anchors(("1", "2")) == ca.trust_anchors(("1", "2"))
    issued = again.sign_svid(WEB, ("web.shop.pod",), HOUR)
    assert verify(issued, ca.trust_anchors(("2",)), clock.now())  # the old instance's root: the same key signed
    assert again.generate("1", CA_TTL) == ca.generate("1", CA_TTL)
    assert snapshot(directory) == before


def test_a_generation_left_half_written_by_a_crash_is_ignored_and_made_again(tmp_path: Path, clock: FakeClock):
    directory = tmp_path / "ca"
    (directory / "generations" / ".1.5f3a9c").mkdir(parents=True)
    (directory / "generations" / ".1.5f3a9c" / "key.pem").write_bytes(b"-----BEGIN PRIV")
    ca = MeshCa(directory, CaSettings(), clock)
    assert ca.status() == ()
    ca.generate("1", CA_TTL)
    assert [g.generation for g in ca.status()] == ["1"]


def test_a_generation_saved_before_a_crash_that_left_no_active_file_is_activated_by_generate_again(
        tmp_path: Path, clock: FakeClock):
    directory = tmp_path / "ca"
    MeshCa(directory, CaSettings(), clock).generate("1", CA_TTL)
    (directory / "active").unlink()
    ca = MeshCa(directory, CaSettings(), clock)
    assert ca.active is None
    ca.generate("1", CA_TTL)
    assert ca.active == "1"


def test_a_ca_key_readable_by_other_users_is_refused_on_load(tmp_path: Path, clock: FakeClock):
    directory = tmp_path / "ca"
    MeshCa(directory, CaSettings(), clock).generate("1", CA_TTL)
    key = directory / "generations" / "1" / "key.pem"
    key.chmod(0o644)
    with pytest.raises(CaConfigError, match=f"^{key}: readable by other users"):
        MeshCa(directory, CaSettings(), clock)


def test_trust_anchors_are_deduplicated_in_a_stable_order_and_unknown_generations_are_refused(ca: MeshCa):
    ca.generate("2", CA_TTL)
    one, two = ca.trust_anchors(("1",))[0], ca.trust_anchors(("2",))[0]
    assert ca.trust_anchors(("1", "2")) == (one, two)
    assert ca.trust_anchors(("2", "1", "2")) == (two, one)
    assert ca.trust_anchors(()) == ()
    with pytest.raises(PermanentError, match="unknown CA generation"):
        ca.trust_anchors(("1", "9"))


def test_status_lists_every_generation_with_its_kind_subject_validity_and_which_is_active(
        ca: MeshCa, clock: FakeClock):
    clock.advance(60)
    for gen in ("2", "10"):
        ca.generate(gen, CA_TTL)
    ca.activate("10")
    status = ca.status()
    assert [(s.generation, s.kind, s.active, s.key_type) for s in status] == [
        ("1", "root", False, "ec-p256"), ("2", "root", False, "ec-p256"), ("10", "root", True, "ec-p256")]
    first = status[0]
    assert first.subject == first.issuer == "CN=Meshloom root 1,O=example.org"
    assert first.not_before == T0 - timedelta(seconds=60)
    assert first.not_after == T0 + timedelta(seconds=CA_TTL)
    root = ca.trust_anchors(("1",))[0]
    assert first.serial == format(root.serial_number, "x")


def test_a_self_signed_generation_is_a_root_that_may_sign_only_leaves_and_names_the_trust_domain(ca: MeshCa):
    root = ca.trust_anchors(("1",))[0]
    basic = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


# ---- upstream ------------------------------------------------------------------------------------------------------
def test_upstream_mode_makes_intermediates_whose_chain_verifies_to_the_upstream_root(tmp_path: Path,
                                                                                     clock: FakeClock):
    up = self_signed_upstream(tmp_path / "up", T0, days=10)
    ca = MeshCa(tmp_path / "ca", CaSettings(upstream=up.files), clock)
    gen = ca.generate("1", CA_TTL)
    assert gen.not_after == up.root.not_valid_after_utc  # 720 h asked, cut to the upstream's 10 days
    assert ca.trust_anchors(("1",)) == (up.root,)
    issued = ca.sign_svid(WEB, ("web.shop.pod",), HOUR)
    (intermediate,) = issued.chain
    assert intermediate.issuer == up.root.subject
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert verify(issued, (up.root,), clock.now()) == [issued.certificate, intermediate, up.root]
    svid = X509Svid.parse_raw(*svid_der(issued))
    assert str(svid.spiffe_id) == WEB and len(svid.cert_chain) == 2
    assert [(s.kind, s.issuer) for s in ca.status()] == [("intermediate", up.root.subject.rfc4514_string())]
    assert (tmp_path / "ca" / "generations" / "1" / "bundle.pem").read_bytes() == pem([up.root])


def test_an_upstream_that_is_itself_an_intermediate_chains_through_it_to_the_root_in_the_bundle_file(
        tmp_path: Path, clock: FakeClock):
    up, upstream_cert = intermediate_upstream(tmp_path / "up", T0)
    ca = MeshCa(tmp_path / "ca", CaSettings(upstream=up.files), clock)
    ca.generate("1", CA_TTL)
    issued = ca.sign_svid(WEB, ("web.shop.pod",), HOUR)
    assert issued.chain[1:] == (upstream_cert,)
    assert ca.trust_anchors(("1",)) == (up.root,)
    assert verify(issued, (up.root,), clock.now())[1:] == [issued.chain[0], upstream_cert, up.root]
    X509Svid.parse_raw(*svid_der(issued))
    # A restart reads the chain back from the generation's own files.
    again = MeshCa(tmp_path / "ca", CaSettings(upstream=up.files), clock)
    assert again.sign_svid(WEB, ("web.shop.pod",), HOUR).chain == issued.chain


def test_no_generation_is_made_once_the_upstream_has_less_than_two_svid_lives_left(tmp_path: Path,
                                                                                     clock: FakeClock):
    up = self_signed_upstream(tmp_path / "up", T0, days=1)
    ca = MeshCa(tmp_path / "ca", CaSettings(upstream=up.files), clock)
    ca.generate("1", CA_TTL)
    clock.advance(21.5 * HOUR)  # 2.5 h of the upstream's day left
    assert ca.generate("2", CA_TTL).not_after == up.root.not_valid_after_utc
    clock.advance(HOUR)
    with pytest.raises(PermanentError, match="import a new upstream CA"):
        ca.generate("3", CA_TTL)


def test_the_wire_forms_are_der_leaf_first_and_pkcs8(tmp_path: Path, clock: FakeClock):
    up, upstream_cert = intermediate_upstream(tmp_path / "up", T0)
    ca = MeshCa(tmp_path / "ca", CaSettings(upstream=up.files), clock)
    ca.generate("1", CA_TTL)
    issued = ca.sign_svid(WEB, ("web.shop.pod",), HOUR)
    chain, key = svid_der(issued)
    parts = der_certificates((issued.certificate, *issued.chain))
    assert chain == b"".join(parts) and len(parts) == 3
    assert x509.load_der_x509_certificate(parts[0]) == issued.certificate
    assert x509.load_der_x509_certificate(parts[2]) == upstream_cert
    assert serialization.load_der_private_key(key, None).public_key() == issued.private_key.public_key()


# ---- refusals ------------------------------------------------------------------------------------------------------
@dataclass
class Refusal:
    message: str  # a regular expression for the whole one-line message; {tmp} is the test's folder
    attempt: Callable[[Path, FakeClock], object]


def _upstream_settings(build: Callable[[Path], UpstreamFiles]) -> Callable[[Path, FakeClock], object]:
    def attempt(tmp: Path, clock: FakeClock) -> object:
        return MeshCa(tmp / "ca", CaSettings(upstream=build(tmp)), clock)
    return attempt


def _not_a_ca(tmp: Path) -> UpstreamFiles:
    cert, key = make_ca_cert("Corp Server", ca=False, not_before=T0 - timedelta(days=1),
                             not_after=T0 + timedelta(days=365))
    return UpstreamFiles(write_pem(tmp / "up.pem", cert), write_pem(tmp / "up.key", key))


def _key_mismatch(tmp: Path) -> UpstreamFiles:
    cert, _ = make_ca_cert("Corp Root", not_before=T0 - timedelta(days=1), not_after=T0 + timedelta(days=365))
    stranger = ec.generate_private_key(ec.SECP256R1())
    return UpstreamFiles(write_pem(tmp / "up.pem", cert), write_pem(tmp / "up.key", stranger))


def _expired(tmp: Path) -> UpstreamFiles:
    cert, key = make_ca_cert("Corp Root", not_before=T0 - timedelta(days=400), not_after=T0 - timedelta(days=1))
    return UpstreamFiles(write_pem(tmp / "up.pem", cert), write_pem(tmp / "up.key", key))


def _expires_too_soon(tmp: Path) -> UpstreamFiles:
    cert, key = make_ca_cert("Corp Root", not_before=T0 - timedelta(days=1), not_after=T0 + timedelta(minutes=90))
    return UpstreamFiles(write_pem(tmp / "up.pem", cert), write_pem(tmp / "up.key", key))


def _no_root(tmp: Path) -> UpstreamFiles:
    up, _ = intermediate_upstream(tmp / "pki", T0)
    return UpstreamFiles(up.files.cert, up.files.key, None)


def _wrong_root(tmp: Path) -> UpstreamFiles:
    up, _ = intermediate_upstream(tmp / "pki", T0)
    other = self_signed_upstream(tmp / "other", T0)
    return UpstreamFiles(up.files.cert, up.files.key, other.files.cert)


def _pathlen_zero(tmp: Path) -> UpstreamFiles:
    cert, key = make_ca_cert("Corp Root", not_before=T0 - timedelta(days=1), not_after=T0 + timedelta(days=365),
                             path_length=0)
    return UpstreamFiles(write_pem(tmp / "up.pem", cert), write_pem(tmp / "up.key", key))


def _missing_key(tmp: Path) -> UpstreamFiles:
    up = self_signed_upstream(tmp / "pki", T0)
    return UpstreamFiles(up.files.cert, tmp / "absent.key")


def _key_is_a_certificate(tmp: Path) -> UpstreamFiles:
    up = self_signed_upstream(tmp / "pki", T0)
    return UpstreamFiles(up.files.cert, up.files.cert)


REFUSALS = {
    "not a CA": Refusal(r"{tmp}/up.pem: not a CA certificate \(basicConstraints CA is false\)",
                        _upstream_settings(_not_a_ca)),
    "key mismatch": Refusal(r"{tmp}/up.key: the key does not match the certificate {tmp}/up.pem",
                            _upstream_settings(_key_mismatch)),
    "expired upstream": Refusal(r"{tmp}/up.pem: expired on 2025-12-31T00:00:00Z", _upstream_settings(_expired)),
    "upstream expiring within two SVID lives": Refusal(
        r"{tmp}/up.pem: expires on 2026-01-01T01:30:00Z, sooner than twice the SVID TTL \(2h\) from now",
        _upstream_settings(_expires_too_soon)),
    "no root for an intermediate upstream": Refusal(
        r"{tmp}/pki/up.pem: CN=Corp Mesh Issuing,O=Corp is not self-signed, and no bundle file names the root .*",
        _upstream_settings(_no_root)),
    "a bundle without the upstream's root": Refusal(r"{tmp}/other/up.pem: no certificate in it issued .*",
                                                    _upstream_settings(_wrong_root)),
    "an upstream that may not sign a CA": Refusal(r"{tmp}/up.pem: pathLenConstraint 0 of .* forbids .*",
                                                  _upstream_settings(_pathlen_zero)),
    "a missing key file": Refusal(r"{tmp}/absent.key: cannot be read \(No such file or directory\)",
                                  _upstream_settings(_missing_key)),
    "a key file holding a certificate": Refusal(r"{tmp}/pki/up.pem: not a PEM private key",
                                                _upstream_settings(_key_is_a_certificate)),
    "unknown key type": Refusal(r"--key-type: unknown key type 'ed448' \(choose ec-p256, ec-p384, rsa-2048, rsa-4096\)",
                                lambda tmp, clock: CaSettings.from_flags(key_type="ed448")),
    "SVID TTL below the minimum": Refusal(r"--svid-ttl: 4m is below the minimum of 5m \(.*\)",
                                          lambda tmp, clock: CaSettings.from_flags(svid_ttl="4m")),
    "CA TTL below the minimum": Refusal(r"--ca-ttl: 59m is below the minimum of 1h",
                                        lambda tmp, clock: CaSettings.from_flags(svid_ttl="5m", ca_ttl="59m")),
    "CA TTL not above twice the SVID TTL": Refusal(r"--ca-ttl: 2h must exceed twice the SVID TTL \(2h\), .*",
                                                   lambda tmp, clock: CaSettings.from_flags(ca_ttl="2h")),
    "not a duration": Refusal(r"--svid-ttl: '1d' is not a duration \(.*\)",
                              lambda tmp, clock: CaSettings.from_flags(svid_ttl="1d")),
    "bad trust domain": Refusal(r"--trust-domain: 'Example.org' is not a SPIFFE trust domain \(.*\)",
                                lambda tmp, clock: CaSettings.from_flags(trust_domain="Example.org")),
    "bad trust domain in a constructor": Refusal(r"--trust-domain: 'spiffe://example.org' is not a SPIFFE .*",
                                                 lambda tmp, clock: CaSettings(trust_domain="spiffe://example.org")),
    "another trust domain than the saved CA's": Refusal(
        r"--trust-domain: 'corp.example' differs from the trust domain of the CA generation in "
        r"{tmp}/ca/generations/1 \(spiffe://example.org\)",
        lambda tmp, clock: MeshCa(tmp / "ca", CaSettings(trust_domain="corp.example"), clock)),
    "an upstream key without its certificate": Refusal(
        r"--upstream-cert: an upstream CA needs both its certificate and its key",
        lambda tmp, clock: CaSettings.from_flags(upstream_key=tmp / "up.key")),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_a_bad_configuration_is_refused_in_one_line_naming_the_flag_or_file_and_leaves_the_ca_untouched(
        tmp_path: Path, clock: FakeClock, case: str):
    refusal = REFUSALS[case]
    existing = MeshCa(tmp_path / "ca", CaSettings(), clock)
    existing.generate("1", CA_TTL)
    existing.generate("2", CA_TTL)
    before = snapshot(tmp_path / "ca")
    clock.advance(HOUR)

    with pytest.raises(CaConfigError) as refused:
        refusal.attempt(tmp_path, clock)

    message = str(refused.value)
    assert "\n" not in message
    pattern = refusal.message.replace("{tmp}", str(tmp_path))
    assert re.fullmatch(pattern, message), message
    assert snapshot(tmp_path / "ca") == before
    assert existing.sign_svid(WEB, ("web.shop.pod",), HOUR).generation == "1"  # the running CA signs on


def test_a_refused_upstream_creates_no_ca_directory(tmp_path: Path, clock: FakeClock):
    with pytest.raises(CaConfigError):
        MeshCa(tmp_path / "fresh", CaSettings(upstream=_expired(tmp_path)), clock)
    assert not (tmp_path / "fresh").exists()


def test_durations_read_and_print_as_the_flags_write_them():
    assert parse_duration("1h") == 3600
    assert parse_duration("30m") == 1800
    assert parse_duration("720h") == 720 * 3600
    assert parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400
    for bad in ("", "1", "h", "1d", "-1h", "1h 30m", "1H"):
        with pytest.raises(CaConfigError):
            parse_duration(bad)
    assert [format_duration(s) for s in (3600, 300, 90, 5400, 720 * 3600, 0)] == [
        "1h", "5m", "1m30s", "1h30m", "720h", "0s"]
    assert (MIN_SVID_TTL, MIN_CA_TTL) == (300, 3600)


def test_default_settings_are_nginx_service_meshs():
    s = CaSettings.from_flags()
    assert (s.trust_domain, s.key_type, s.svid_ttl, s.ca_ttl, s.upstream) == (
        "example.org", KeyType.EC_P256, 3600.0, 720 * 3600.0, None)
    assert CaSettings() == s


# ---- mutual TLS ----------------------------------------------------------------------------------------------------
@pytest.fixture
def now_clock() -> FakeClock:
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@dataclass
class Mode:
    name: str
    make: Callable[[Path, FakeClock], MeshCa]


def _self_signed_ca(tmp: Path, clock: FakeClock) -> MeshCa:
    return MeshCa(tmp / "ca", CaSettings(), clock)


def _upstream_ca(tmp: Path, clock: FakeClock) -> MeshCa:
    up, _ = intermediate_upstream(tmp / "up", clock.now())
    return MeshCa(tmp / "ca", CaSettings(upstream=up.files), clock)


MODES = [Mode("self-signed", _self_signed_ca), Mode("upstream", _upstream_ca)]


@pytest.fixture(params=MODES, ids=[m.name for m in MODES])
def any_mode(request: pytest.FixtureRequest) -> Mode:
    mode: Mode = request.param
    return mode


def test_two_workloads_complete_mutual_tls_and_each_sees_the_others_spiffe_id(
        tmp_path: Path, now_clock: FakeClock, any_mode: Mode):
    ca = any_mode.make(tmp_path, now_clock)
    ca.generate("1", CA_TTL)
    bundle = ca.trust_anchors(("1",))
    web = Peer.of(ca.sign_svid(WEB, ("web.shop.pod",), HOUR), bundle)
    api = Peer.of(ca.sign_svid(API, ("api.shop.pod",), HOUR), bundle)

    h = mtls(tmp_path / "tls", client=web, server=api)

    assert h.ok, (h.client_error, h.server_error)
    assert (h.client_saw, h.server_saw) == (API, WEB)


def test_a_workload_without_the_meshs_bundle_is_refused_by_the_other(tmp_path: Path, now_clock: FakeClock,
                                                                     any_mode: Mode):
    ca = any_mode.make(tmp_path, now_clock)
    ca.generate("1", CA_TTL)
    stranger_ca = MeshCa(tmp_path / "stranger", CaSettings(), now_clock)
    stranger_ca.generate("1", CA_TTL)
    bundle = ca.trust_anchors(("1",))
    stranger = Peer.of(stranger_ca.sign_svid(WEB, ("web.shop.pod",), HOUR), bundle)
    api = Peer.of(ca.sign_svid(API, ("api.shop.pod",), HOUR), bundle)
    assert refused_for_trust(mtls(tmp_path / "a", client=stranger, server=api), by="server")
    assert refused_for_trust(mtls(tmp_path / "b", client=api, server=stranger), by="client")


# A root rotation: old and new leaves trust each other while the bundle holds both roots, and no longer after.
_TRUSTED_WHILE_BOTH_ROOTS = {
    "old client, new server, both roots": True,
    "new client, old server, both roots": True,
    "old client, new server, new root only": False,
    "new client, old server, new root only": False,
}


def _rotation(ca: MeshCa, folder: Path, old: Issued, new: Issued) -> dict[str, bool]:
    """Each handshake of a rotation from generation 1 to 2, named, with whether it went through."""
    bundle_both, bundle_new = ca.trust_anchors(("1", "2")), ca.trust_anchors(("2",))
    cases = {
        "old client, new server, both roots": (Peer.of(old, bundle_both), Peer.of(new, bundle_both)),
        "new client, old server, both roots": (Peer.of(new, bundle_both), Peer.of(old, bundle_both)),
        "old client, new server, new root only": (Peer.of(old, bundle_new), Peer.of(new, bundle_new)),
        "new client, old server, new root only": (Peer.of(new, bundle_new), Peer.of(old, bundle_new)),
    }
    outcome: dict[str, bool] = {}
    for i, (name, (client, server)) in enumerate(cases.items()):
        h = mtls(folder / str(i), client=client, server=server)
        if h.ok:
            assert (h.client_saw, h.server_saw) == (svid_spiffe_id(server.certs[0]),
                                                    svid_spiffe_id(client.certs[0]))
        else:  # refused because of trust, by whichever side got the old leaf
            assert refused_for_trust(h, by="server" if client.certs[0] is old.certificate else "client"), name
        outcome[name] = h.ok
    return outcome


def test_during_a_root_rotation_old_and_new_leaves_trust_each_other_until_the_old_root_leaves_the_bundle(
        tmp_path: Path, now_clock: FakeClock):
    ca = MeshCa(tmp_path / "ca", CaSettings(), now_clock)
    ca.generate("1", CA_TTL)
    old = ca.sign_svid(WEB, ("web.shop.pod",), HOUR)
    ca.generate("2", CA_TTL)
    ca.activate("2")
    new = ca.sign_svid(API, ("api.shop.pod",), HOUR)
    assert (old.generation, new.generation) == ("1", "2")

    assert _rotation(ca, tmp_path / "tls", old, new) == _TRUSTED_WHILE_BOTH_ROOTS


def test_under_one_upstream_an_intermediate_rotation_keeps_the_bundle_so_old_leaves_stay_trusted(
        tmp_path: Path, now_clock: FakeClock):
    ca = _upstream_ca(tmp_path, now_clock)
    ca.generate("1", CA_TTL)
    old = ca.sign_svid(WEB, ("web.shop.pod",), HOUR)
    ca.generate("2", CA_TTL)
    ca.activate("2")
    new = ca.sign_svid(API, ("api.shop.pod",), HOUR)
    assert old.chain[0] != new.chain[0]
    # Both generations' anchor is the upstream root: retiring generation 1 cannot distrust its leaves, which stay
    # valid until they expire (one SVID TTL at most).
    assert ca.trust_anchors(("2",)) == ca.trust_anchors(("1", "2"))

    outcome = _rotation(ca, tmp_path / "tls", old, new)

    assert all(outcome.values()), outcome


def test_when_the_upstream_root_changes_old_and_new_leaves_trust_each_other_until_the_old_root_leaves_the_bundle(
        tmp_path: Path, now_clock: FakeClock):
    first = self_signed_upstream(tmp_path / "up1", now_clock.now(), name="Corp Root 2025")
    ca = MeshCa(tmp_path / "ca", CaSettings(upstream=first.files), now_clock)
    ca.generate("1", CA_TTL)
    old = ca.sign_svid(WEB, ("web.shop.pod",), HOUR)
    # The operator imports a new upstream root and restarts: generation 1 keeps its own anchors on disk.
    second = self_signed_upstream(tmp_path / "up2", now_clock.now(), name="Corp Root 2026")
    ca = MeshCa(tmp_path / "ca", CaSettings(upstream=second.files), now_clock)
    ca.generate("2", CA_TTL)
    ca.activate("2")
    new = ca.sign_svid(API, ("api.shop.pod",), HOUR)
    assert ca.trust_anchors(("1", "2")) == (first.root, second.root)

    assert _rotation(ca, tmp_path / "tls", old, new) == _TRUSTED_WHILE_BOTH_ROOTS


def test_an_expired_leaf_no_longer_verifies(ca: MeshCa, clock: FakeClock):
    issued = ca.sign_svid(WEB, ("web.shop.pod",), 600)
    verify(issued, ca.trust_anchors(("1",)), clock.now() + timedelta(seconds=599))
    with pytest.raises(VerificationError):
        verify(issued, ca.trust_anchors(("1",)), clock.now() + timedelta(seconds=601))


# ---- the fake ------------------------------------------------------------------------------------------------------
def test_the_fake_ca_signs_real_svids_and_answers_its_trust_anchors(clock: FakeClock):
    fake = FakeCertificateAuthority(clock)
    fake.generate("1", CA_TTL)
    fake.generate("2", CA_TTL)
    issued = fake.sign_svid(WEB, ("web.shop.pod",), HOUR)
    assert (issued.generation, issued.chain, issued.not_before) == ("1", (), clock.now())
    assert str(X509Svid.parse_raw(*svid_der(issued)).spiffe_id) == WEB
    one, two = fake.trust_anchors(("1",))[0], fake.trust_anchors(("2",))[0]
    assert fake.trust_anchors(("2", "1", "1")) == (two, one)
    verify(issued, (one,), clock.now())
    with pytest.raises(PermanentError):
        fake.trust_anchors(("3",))
