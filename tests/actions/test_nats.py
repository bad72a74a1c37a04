"""Configuration propagation over a real nats-server with TLS client certificates mapped to per-identity users.

Every integration test runs its own server in tmp_path, on loopback, with a test PKI (tests/support/natspki.py).
Nothing is timed: tests wait on queues and events with generous timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import pytest

import catalog
from actions.errors import PermanentError, TemporaryError
from actions.nats import (
    FakeConfigPublisher,
    NatsConfigPublisher,
    NatsServer,
    envelope,
    inbox_prefix,
    render_config,
    user_permissions,
)
from catalog.documents import digest as shard_digest
from catalog.subjects import (
    SHARD_DIRECT_GET_WILDCARD,
    SHARD_WILDCARD,
    BadToken,
    ack_subject,
    config_subject,
    direct_get_subject,
    namespace_from_shard_subject,
    shard_direct_get_subject,
    shard_key,
    shard_subject,
    sidecar_from_ack_subject,
    sidecar_from_token,
    subject_token,
)
from sidecar.config import BadEnvelope, ConfigClient, parse_envelope, wanted_shards
from tests.catalog import topology
from tests.support.natspki import Svid, TestPki, client_context
from tests.support.wait import eventually

T = TypeVar("T")
WAIT = 20.0  # seconds: generous, never a measurement
CONTROL = ("meshloom", "controller")
WEB = "default/web-7d9.abc"  # pod names may contain dots
API = "default/api-0"
OTHER = "shop/cart.v2"


# ---- naming, envelope, permissions (pure) ---------------------------------------------------------------------
@pytest.mark.parametrize("key", [WEB, API, OTHER, "a/b_c", "a/b_2Ec", "ns/ünïcode", "x/a.b.c/d", "-/-"])
def test_a_sidecar_key_becomes_one_safe_token_and_back(key: str) -> None:
    token = subject_token(key)
    assert "." not in token and "/" not in token and "*" not in token and ">" not in token and "$" not in token
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in token)
    assert sidecar_from_token(token) == key
    assert sidecar_from_ack_subject(ack_subject(key)) == key


def test_tokens_do_not_collide_where_escaping_could_confuse_them() -> None:
    keys = ["a/b.c", "a/b_c", "a/b_2Ec", "a.b/c", "a/b/c", "a_2Fb/c", "A/b.c"]
    assert len({subject_token(k) for k in keys}) == len(keys)


@pytest.mark.parametrize("token", ["a_2", "a_zz", "a.b", "a_61", "", "_FF"])
def test_a_string_no_key_maps_to_is_not_a_token(token: str) -> None:
    with pytest.raises(BadToken):
        sidecar_from_token(token)


def test_the_subjects_of_a_sidecar() -> None:
    assert subject_token(WEB) == "default_2Fweb-7d9_2Eabc"
    assert config_subject(WEB) == "$KV.meshloom-config.default_2Fweb-7d9_2Eabc"
    assert direct_get_subject(WEB) == ("$JS.API.DIRECT.GET.KV_meshloom-config."
                                       "$KV.meshloom-config.default_2Fweb-7d9_2Eabc")
    assert ack_subject(WEB) == "meshloom.ack.default_2Fweb-7d9_2Eabc"
    assert inbox_prefix("spiffe://example.org/ns/default/sa/web") == (
        "_INBOX.spiffe_3A_2F_2Fexample_2Eorg_2Fns_2Fdefault_2Fsa_2Fweb")


def test_the_envelope_carries_sidecar_generation_and_the_document_as_rendered() -> None:
    value = envelope(WEB, 7, b'{"routes": [1, 2]}\n')
    assert json.loads(value) == {"sidecar": WEB, "generation": 7, "document": {"routes": [1, 2]}}
    assert parse_envelope(value, WEB) == (7, {"routes": [1, 2]})
    with pytest.raises(BadEnvelope, match="meant for"):
        parse_envelope(value, API)


@pytest.mark.parametrize("document, generation", [(b"[1]", 1), (b"{", 1), (b"\xff", 1), (b"{}", 0), (b"{}", True)])
def test_a_document_that_is_not_a_json_object_or_a_bad_generation_is_refused_for_good(document: bytes,
                                                                                       generation: int) -> None:
    with pytest.raises(PermanentError):
        envelope(WEB, generation, document)


def test_identities_get_the_subjects_of_all_their_sidecars_and_nothing_else() -> None:
    control = "spiffe://example.org/ns/meshloom/sa/controller"
    web = "spiffe://example.org/ns/default/sa/web"
    perms = user_permissions({WEB: web, "default/web-2": web, OTHER: "spiffe://example.org/ns/shop/sa/cart"},
                             control)
    assert list(perms) == [control, web, "spiffe://example.org/ns/shop/sa/cart"]
    assert perms[control].publish == (">",) and perms[control].subscribe == (">",)
    assert set(perms[web].publish) == {ack_subject(WEB), ack_subject("default/web-2"), direct_get_subject(WEB),
                                       direct_get_subject("default/web-2"), SHARD_DIRECT_GET_WILDCARD}
    assert set(perms[web].subscribe) == {config_subject(WEB), config_subject("default/web-2"), SHARD_WILDCARD,
                                         f"{inbox_prefix(web)}.>"}
    cart = perms["spiffe://example.org/ns/shop/sa/cart"]
    assert SHARD_WILDCARD in cart.subscribe and SHARD_DIRECT_GET_WILDCARD in cart.publish  # every identity


@pytest.mark.parametrize("identity", ["web.default.svc", 'spiffe://example.org/ns/a/sa/b"', "spiffe://x/ a"])
def test_only_spiffe_ids_become_nats_users(identity: str) -> None:
    with pytest.raises(PermanentError, match="not a SPIFFE ID"):
        user_permissions({WEB: identity}, "spiffe://example.org/ns/meshloom/sa/controller")


def test_the_rendered_config_maps_certificates_to_users_on_loopback(tmp_path: Path) -> None:
    users = user_permissions({WEB: "spiffe://example.org/ns/default/sa/web"},
                             "spiffe://example.org/ns/meshloom/sa/controller")
    text = render_config(port=0, monitor_port=0, workdir=tmp_path, cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                         ca=tmp_path / "ca.pem", users=users, max_payload=1024)
    assert 'listen: "127.0.0.1:-1"' in text and 'http: "127.0.0.1:-1"' in text
    assert "verify_and_map: true" in text and "jetstream {" in text
    assert f'"{direct_get_subject(WEB)}"' in text
    assert f'"{SHARD_WILDCARD}"' in text and f'"{SHARD_DIRECT_GET_WILDCARD}"' in text


def test_the_fake_publisher_behaves_like_the_real_one() -> None:
    fake = FakeConfigPublisher()
    fake.publish(WEB, 1, b'{"a": 1}')
    assert fake.published == {WEB: 1} and json.loads(fake.documents[WEB])["document"] == {"a": 1}
    with pytest.raises(PermanentError):
        fake.publish(WEB, 2, b"not json")
    fake.down = True
    with pytest.raises(TemporaryError):
        fake.publish(WEB, 2, b"{}")
    fake.down = False
    fake.delete(WEB)
    assert fake.published == {} and fake.history == [(WEB, 1)]


# ---- outbound shards (pure) -------------------------------------------------------------------------------------
def shard(namespace: str, *services: str) -> bytes:
    """A shard as the catalog renders one: canonical JSON."""
    value = {"schema": "meshloom.io/outbound-shard/v1alpha1", "namespace": namespace,
             "services": {name: {"address": None, "ports": [], "split": None, "circuitBreaker": None}
                          for name in services}}
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sha(body: bytes) -> str:
    return shard_digest(body)  # how a document names a shard: the catalog's one definition


SHOP, SHOP_V2, PAY = shard("shop", "web"), shard("shop", "web", "api"), shard("pay", "payments")


def test_the_subjects_of_a_shard_are_two_tokens_that_no_sidecar_key_has() -> None:
    assert shard_key("shop") == "shard.shop"
    assert shard_subject("shop") == "$KV.meshloom-config.shard.shop"
    assert shard_direct_get_subject("shop") == ("$JS.API.DIRECT.GET.KV_meshloom-config."
                                                "$KV.meshloom-config.shard.shop")
    assert namespace_from_shard_subject(shard_subject("shop")) == "shop"
    assert shard_subject("shop").startswith(SHARD_WILDCARD[:-1])
    assert shard_direct_get_subject("shop").startswith(SHARD_DIRECT_GET_WILDCARD[:-1])
    for key in (WEB, API, OTHER, "shard", "shard/x", "shard.x", "shard_2Ex"):
        assert not config_subject(key).startswith(SHARD_WILDCARD[:-1])  # no document falls under the wildcard
        assert not direct_get_subject(key).startswith(SHARD_DIRECT_GET_WILDCARD[:-1])


@pytest.mark.parametrize("subject", [config_subject(WEB), "$KV.meshloom-config.shard.a.b",
                                     "$KV.meshloom-config.shard."])
def test_a_subject_that_is_not_a_shards_names_no_namespace(subject: str) -> None:
    with pytest.raises(BadToken):
        namespace_from_shard_subject(subject)


def test_the_shards_a_document_names() -> None:
    assert wanted_shards({"routes": []}) == {}  # a document without outbound needs none
    assert wanted_shards({"outbound": {"shards": {"shop": sha(SHOP)}}}) == {"shop": sha(SHOP)}
    bad: dict[str, Any]
    for bad in ({"outbound": []}, {"outbound": {}}, {"outbound": {"shards": {"shop": 1}}},
                {"outbound": {"shards": {"shop": ""}}},
                {"outbound": {"shards": {"": sha(SHOP)}}}):
        with pytest.raises(BadEnvelope):
            wanted_shards(bad)


def test_the_fake_publisher_keeps_the_bytes_of_each_shard() -> None:
    fake = FakeConfigPublisher()
    fake.publish_shard("shop", SHOP)
    assert fake.shards == {"shop": SHOP}
    with pytest.raises(PermanentError):
        fake.publish_shard("shop", b"[1]")
    fake.down = True
    with pytest.raises(TemporaryError):
        fake.publish_shard("shop", SHOP_V2)
    with pytest.raises(TemporaryError):
        fake.delete_shard("shop")
    fake.down = False
    fake.delete_shard("shop")
    assert fake.shards == {}


# ---- a mesh on a real server ----------------------------------------------------------------------------------
class Sidecar:
    """A ConfigClient on its own thread, its applies and errors in queues."""

    def __init__(self, url: str, key: str, svid: Svid, *, fail_applies: int = 0) -> None:
        self.key = key
        self.applied: queue.Queue[tuple[dict[str, Any], dict[str, dict[str, Any]]]] = queue.Queue()
        self.errors: queue.Queue[Exception] = queue.Queue()
        self._fail = fail_applies
        self.client = ConfigClient(url, key, svid.context(), self._apply, inbox_prefix(svid.spiffe_id),
                                   on_error=self.errors.put)

    def _apply(self, document: dict[str, Any], shards: dict[str, dict[str, Any]]) -> None:
        if self._fail:
            self._fail -= 1
            raise RuntimeError("the proxy refused it")
        self.applied.put((document, shards))

    def start(self) -> Sidecar:
        self.client.start()
        assert self.client.synced.wait(WAIT), "the sidecar did not connect and read its document"
        return self

    def next_applied(self) -> dict[str, Any]:
        """The next document applied; one that names no shards is applied with none."""
        document, shards = self.applied.get(timeout=WAIT)
        assert shards == {} or "outbound" in document
        return document

    def next_apply(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        return self.applied.get(timeout=WAIT)


class Mesh:
    def __init__(self, tmp_path: Path, sidecars: dict[str, tuple[str, str]], *, port: int = 0) -> None:
        self.pki = TestPki(tmp_path / "pki")
        server = self.pki.server()
        self.control = self.pki.svid(*CONTROL)
        self.svids: dict[tuple[str, str], Svid] = {}
        self.server = NatsServer(tmp_path / "nats", cert=server.cert, key=server.key, ca=self.pki.ca,
                                 control_plane=self.control.spiffe_id, port=port)
        self.server.set_sidecars({key: self.svid(*who).spiffe_id for key, who in sidecars.items()})
        self.server.start()
        self.acks: queue.Queue[tuple[str, int]] = queue.Queue()
        self.publisher = NatsConfigPublisher(self.server.url, self.control.context(),
                                             lambda s, g: self.acks.put((s, g)),
                                             inbox=inbox_prefix(self.control.spiffe_id))
        self.sidecars: list[Sidecar] = []
        self.spies: list[Spy] = []

    def svid(self, ns: str, sa: str) -> Svid:
        if (ns, sa) not in self.svids:
            self.svids[(ns, sa)] = self.pki.svid(ns, sa)
        return self.svids[(ns, sa)]

    def sidecar(self, key: str, who: tuple[str, str], *, url: str | None = None, start: bool = True,
                fail_applies: int = 0) -> Sidecar:
        car = Sidecar(url or self.server.url, key, self.svid(*who), fail_applies=fail_applies)
        self.sidecars.append(car)
        return car.start() if start else car

    def publish(self, key: str, generation: int, **document: Any) -> None:
        self.publisher.publish(key, generation, json.dumps(document).encode())

    def next_ack(self) -> tuple[str, int]:
        return self.acks.get(timeout=WAIT)

    def spy(self, *subjects: str) -> Spy:
        self.spies.append(Spy(self.server.url, self.control, subjects))
        return self.spies[-1]

    def close(self) -> None:
        for car in self.sidecars:
            car.client.stop()
        for spy in self.spies:
            spy.close()
        self.publisher.close()
        self.server.stop()


class Spy:
    """A connection of the control plane's identity (allowed everything) that counts the messages crossing the
    server on some exact subjects: the direct gets the sidecars send, the shards the publisher stores."""

    def __init__(self, url: str, svid: Svid, subjects: tuple[str, ...]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc = self._run(_raw(url, svid.context(), inbox=inbox_prefix(svid.spiffe_id)))
        self.subs = {subject: self._run(self.nc.subscribe(subject)) for subject in subjects}
        self._run(self.nc.flush(timeout=int(WAIT)))  # the server holds the subscriptions from here on

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def count(self, subject: str) -> int:
        """Every message the server routed on `subject` before this call: the server answers the flush's PING
        after it has written them, and the client counts a message as it reads it."""
        self._run(self.nc.flush(timeout=int(WAIT)))
        return int(self.subs[subject].delivered)

    def close(self) -> None:
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            self._run(self.nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


@pytest.fixture
def mesh_factory(tmp_path: Path) -> Iterator[Callable[..., Mesh]]:
    made: list[Mesh] = []

    def make(sidecars: dict[str, tuple[str, str]], **kw: Any) -> Mesh:
        made.append(Mesh(tmp_path, sidecars, **kw))
        return made[-1]

    yield make
    for m in made:
        m.close()


@pytest.fixture
def mesh(mesh_factory: Callable[..., Mesh]) -> Mesh:
    return mesh_factory({WEB: ("default", "web"), API: ("default", "api"), OTHER: ("shop", "cart")})


async def _raw(url: str, ctx: ssl.SSLContext, errors: asyncio.Queue[Exception] | None = None,
               inbox: str = "_INBOX") -> Any:
    """A plain nats-py connection, as any program holding that certificate could make it."""
    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.put_nowait(exc)

    return await nats.connect(url, tls=ctx, allow_reconnect=False, connect_timeout=5, error_cb=on_error,
                              inbox_prefix=inbox)


async def _next_error(errors: asyncio.Queue[Exception]) -> str:
    return str(await asyncio.wait_for(errors.get(), WAIT)).lower()  # nats-py lower-cases the server's text


def _assert_unauthorised(url: str, ctx: ssl.SSLContext) -> None:
    """A connection with this certificate is refused by the server's authorization (not by TLS)."""
    async def attempt() -> None:
        with pytest.raises(nats.errors.Error) as refused:
            await _raw(url, ctx)
        assert isinstance(refused.value, nats.errors.AuthorizationError) or "authorization violation" in str(
            refused.value).lower()

    asyncio.run(attempt())


@pytest.mark.integration
def test_a_sidecar_receives_its_own_document_and_acknowledges_it(mesh: Mesh) -> None:
    web = mesh.sidecar(WEB, ("default", "web"))
    mesh.publish(WEB, 1, routes=["a"])
    assert web.next_applied() == {"routes": ["a"]}
    assert mesh.next_ack() == (WEB, 1)
    mesh.publish(WEB, 2, routes=["a", "b"])
    assert web.next_applied() == {"routes": ["a", "b"]}
    assert mesh.next_ack() == (WEB, 2)
    assert web.client.applied_generation == 2


@pytest.mark.integration
def test_a_republished_generation_is_acknowledged_again_without_applying_it_again(mesh: Mesh) -> None:
    web = mesh.sidecar(WEB, ("default", "web"))
    mesh.publish(WEB, 1, routes=[])
    assert web.next_applied() == {"routes": []} and mesh.next_ack() == (WEB, 1)
    mesh.publish(WEB, 1, routes=[])  # what the rollout does for a sidecar whose ack it did not get
    assert mesh.next_ack() == (WEB, 1)
    assert web.applied.empty()


@pytest.mark.integration
def test_a_failed_apply_is_not_acknowledged_and_the_next_read_applies_it(mesh: Mesh) -> None:
    web = mesh.sidecar(WEB, ("default", "web"), fail_applies=1)
    mesh.publish(WEB, 1, routes=["x"])
    assert web.client.connected.is_set()
    web.client.resync()  # the periodic resync, brought forward
    assert web.next_applied() == {"routes": ["x"]}
    assert mesh.next_ack() == (WEB, 1)  # the only ack: the failed apply sent none


@pytest.mark.integration
def test_a_sidecar_can_neither_read_another_sidecars_document_nor_acknowledge_for_it(mesh: Mesh) -> None:
    mesh.publish(API, 1, secret="api's")
    web = mesh.svid("default", "web")

    async def attempt() -> None:
        errors: asyncio.Queue[Exception] = asyncio.Queue()
        nc = await _raw(mesh.server.url, web.context(), errors, inbox_prefix(web.spiffe_id))
        try:
            # its own document: allowed
            mine = await nc.request(direct_get_subject(WEB), b"", timeout=WAIT)
            assert mine.headers and mine.headers.get("Status") == "404"  # allowed, and nothing published yet
            # another sidecar's subject: the server refuses the subscription
            await nc.subscribe(config_subject(API))
            assert "permissions violation for subscription" in await _next_error(errors)
            # a wildcard over every sidecar: refused too, in either form
            await nc.subscribe("$KV.meshloom-config.>")
            assert "permissions violation for subscription" in await _next_error(errors)
            await nc.subscribe("$KV.meshloom-config.*")
            assert "permissions violation for subscription" in await _next_error(errors)
            # another sidecar's document by direct get: the request is dropped, the client told
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(direct_get_subject(API), b"", timeout=1)
            assert "permissions violation for publish" in await _next_error(errors)
            # its own direct-get subject with a request body naming another key, a sequence or a wildcard: the
            # server serves only the key in the subject, and only to an empty request
            # ... and the same through the shard wildcard every sidecar may publish on
            for body in ({"last_by_subj": config_subject(API)}, {"seq": 1}, {"multi_last": ["$KV.meshloom-config.>"]},
                         {"next_by_subj": "$KV.meshloom-config.>", "seq": 1}):
                for subject in (direct_get_subject(WEB), shard_direct_get_subject("shop"), SHARD_DIRECT_GET_WILDCARD):
                    answer = await nc.request(subject, json.dumps(body).encode(), timeout=WAIT)
                    assert answer.headers and answer.headers.get("Status") == "408" and not answer.data
            # the KV API (what kv.get / kv.watch would use): refused
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request("$JS.API.STREAM.INFO.KV_meshloom-config", b"", timeout=1)
            assert "permissions violation for publish" in await _next_error(errors)
            # another inbox (the control plane's replies): refused
            await nc.subscribe("_INBOX.>")
            assert "permissions violation for subscription" in await _next_error(errors)
            # an ack in another sidecar's name
            await nc.publish(ack_subject(API), json.dumps({"generation": 1, "sidecar": API}).encode())
            assert "permissions violation for publish" in await _next_error(errors)
        finally:
            await nc.close()

    asyncio.run(attempt())
    mesh.publish(WEB, 1, ok=True)  # the publisher is still fine, and saw no forged ack
    mesh.sidecar(WEB, ("default", "web"))
    assert mesh.next_ack() == (WEB, 1)


@pytest.mark.integration
def test_a_batch_of_documents_is_published_at_once_and_each_acknowledged(mesh: Mesh) -> None:
    web, api = mesh.sidecar(WEB, ("default", "web")), mesh.sidecar(API, ("default", "api"))
    mesh.publisher.publish_many([(WEB, 1, b'{"n": "web"}'), (API, 1, b'{"n": "api-old"}'), (API, 2, b'{"n": "api"}')])
    assert web.next_applied() == {"n": "web"}
    assert api.next_applied() == {"n": "api"}  # the last item for a sidecar wins
    assert {mesh.next_ack(), mesh.next_ack()} == {(WEB, 1), (API, 2)}


@pytest.mark.integration
def test_pods_sharing_a_service_account_share_their_identitys_subjects(mesh_factory: Callable[..., Mesh]) -> None:
    mesh = mesh_factory({WEB: ("default", "web"), "default/web-2": ("default", "web")})
    one, two = mesh.sidecar(WEB, ("default", "web")), mesh.sidecar("default/web-2", ("default", "web"))
    mesh.publish(WEB, 1, n=1)
    mesh.publish("default/web-2", 1, n=2)
    assert one.next_applied() == {"n": 1} and two.next_applied() == {"n": 2}
    assert {mesh.next_ack(), mesh.next_ack()} == {(WEB, 1), ("default/web-2", 1)}


@pytest.mark.integration
def test_an_identity_the_mesh_does_not_know_is_refused(mesh: Mesh) -> None:
    stranger = mesh.pki.svid("default", "stranger", dns_name="web.default.svc")

    _assert_unauthorised(mesh.server.url, stranger.context())


@pytest.mark.integration
def test_a_connection_without_a_client_certificate_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    other_ca = TestPki(tmp_path / "other")
    impostor = other_ca.svid("default", "web")  # the right SPIFFE ID, signed by a CA the mesh does not trust

    async def attempt(ctx: ssl.SSLContext) -> None:
        with pytest.raises((nats.errors.Error, OSError, ssl.SSLError, asyncio.TimeoutError)):
            nc = await _raw(mesh.server.url, ctx)
            await nc.close()

    asyncio.run(attempt(client_context(mesh.pki.ca)))  # trusts the server, presents nothing
    trusting = client_context(mesh.pki.ca, impostor)
    asyncio.run(attempt(trusting))


@pytest.mark.integration
def test_a_sidecar_that_connects_after_three_publishes_gets_only_the_latest(mesh: Mesh) -> None:
    for generation in (1, 2, 3):
        mesh.publish(WEB, generation, version=generation)
    web = mesh.sidecar(WEB, ("default", "web"))
    assert web.next_applied() == {"version": 3}
    assert mesh.next_ack() == (WEB, 3)
    assert web.applied.empty() and web.client.applied_generation == 3


class Cable:
    """A TCP forwarder to the server that the test can cut and mend: the sidecar's network, unplugged."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.up = True
        self._writers: set[asyncio.StreamWriter] = set()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(WAIT)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.listener = self.loop.run_until_complete(asyncio.start_server(self._pipe, "127.0.0.1", 0))
        self.port = self.listener.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    def cut(self) -> None:
        async def _cut() -> None:
            self.up = False
            for w in self._writers:
                w.close()
            self._writers.clear()
        asyncio.run_coroutine_threadsafe(_cut(), self.loop).result(WAIT)

    def mend(self) -> None:
        self.up = True

    def close(self) -> None:
        async def _close() -> None:
            self.listener.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        self.cut()
        asyncio.run_coroutine_threadsafe(_close(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


@pytest.mark.integration
def test_a_sidecar_offline_during_three_publishes_gets_the_latest_when_it_reconnects(mesh: Mesh) -> None:
    cable = Cable(int(mesh.server.url.rsplit(":", 1)[1]))
    try:
        web = mesh.sidecar(WEB, ("default", "web"), url=f"tls://127.0.0.1:{cable.port}")
        cable.cut()
        eventually(lambda: not web.client.connected.is_set(), "not web.client.connected.is_set()")
        for generation in (1, 2, 3):
            mesh.publish(WEB, generation, version=generation)
        cable.mend()
        assert web.next_applied() == {"version": 3}
        assert mesh.next_ack() == (WEB, 3)
        assert web.applied.empty()
    finally:
        cable.close()


@pytest.mark.integration
def test_set_sidecars_adds_a_sidecar_by_reloading_the_same_server(mesh: Mesh) -> None:
    web = mesh.sidecar(WEB, ("default", "web"))
    pid = mesh.server.pid
    current = mesh.server.sidecars
    assert mesh.server.set_sidecars(current) is False  # nothing changed: no reload
    newcomer = mesh.svid("default", "new")
    assert mesh.server.set_sidecars({**current, "default/new-1": newcomer.spiffe_id}) is True
    assert mesh.server.pid == pid and mesh.server.running()
    assert "Reloaded server configuration" in (mesh.server.workdir / NatsServer.LOG).read_text()
    new = mesh.sidecar("default/new-1", ("default", "new"))
    mesh.publish("default/new-1", 1, hello="new")
    assert new.next_applied() == {"hello": "new"}
    assert mesh.next_ack() == ("default/new-1", 1)
    mesh.publish(WEB, 1, still="connected")  # a sidecar connected before the reload is still served
    assert web.next_applied() == {"still": "connected"}
    assert mesh.next_ack() == (WEB, 1)


@pytest.mark.integration
def test_a_second_pod_of_a_known_identity_that_connects_before_its_grant_gets_its_documents_once_granted(
        mesh: Mesh) -> None:
    # NATS already knows web's identity (WEB's grant), so web-2 is let in, but its own subjects are not granted yet:
    # its subscription and its read are refused. Once granted it must get its document, and later ones live,
    # long before the 30 s resync.
    late = "default/web-2"
    two = mesh.sidecar(late, ("default", "web"), start=False)
    two.client.start()
    refused = two.errors.get(timeout=WAIT)
    assert "permissions violation" in str(refused).lower()
    mesh.server.set_sidecars({**mesh.server.sidecars, late: mesh.svid("default", "web").spiffe_id})
    mesh.publish(late, 1, n=1)
    assert two.next_applied() == {"n": 1}
    mesh.publish(late, 2, n=2)
    assert two.next_applied() == {"n": 2}
    assert {mesh.next_ack(), mesh.next_ack()} == {(late, 1), (late, 2)}


@pytest.mark.integration
def test_a_removed_sidecar_loses_access(mesh_factory: Callable[..., Mesh]) -> None:
    mesh = mesh_factory({WEB: ("default", "web"), "default/web-2": ("default", "web"), API: ("default", "api")})
    web, api = mesh.svid("default", "web"), mesh.svid("default", "api")
    api_car = mesh.sidecar(API, ("default", "api"))
    web_two_car = mesh.sidecar("default/web-2", ("default", "web"))
    mesh.publish(API, 1, n=1)
    assert api_car.next_applied() == {"n": 1}
    assert mesh.server.set_sidecars({WEB: web.spiffe_id}) is True

    # web-2's identity stays (web-1 is still there): the server drops web-2's open subscription.
    assert "permissions violation for subscription" in str(web_two_car.errors.get(timeout=WAIT)).lower()

    # The identity left the mesh: its open connection is closed, and trying again is refused.
    while "authorization" not in repr(api_car.errors.get(timeout=WAIT)).lower():
        pass  # first the closed connection (an unexpected EOF), then the refusals of its reconnects
    assert not api_car.client.connected.is_set()

    _assert_unauthorised(mesh.server.url, api.context())

    # ... and refuses it again to anyone of that identity.
    async def web_two() -> None:
        errors: asyncio.Queue[Exception] = asyncio.Queue()
        nc = await _raw(mesh.server.url, web.context(), errors, inbox_prefix(web.spiffe_id))
        try:
            await nc.subscribe(config_subject("default/web-2"))
            assert "permissions violation for subscription" in await _next_error(errors)
            await nc.subscribe(config_subject(WEB))  # its remaining sidecar: still allowed
            await nc.flush()
            assert errors.empty()
        finally:
            await nc.close()

    asyncio.run(web_two())


@pytest.mark.integration
def test_the_config_file_is_private_and_the_server_is_on_loopback(mesh: Mesh) -> None:
    assert mesh.server.config_path.stat().st_mode & 0o777 == 0o600
    assert mesh.server.url.startswith("tls://127.0.0.1:") and mesh.server.monitor_url.startswith("http://127.0.0.1:")


@pytest.mark.integration
def test_publishing_without_a_server_is_a_temporary_error(mesh: Mesh) -> None:
    mesh.publish(WEB, 1, ok=True)
    mesh.server.stop()
    with pytest.raises(TemporaryError):
        mesh.publish(WEB, 2, ok=False)
    url = mesh.publisher.url
    with pytest.raises(TemporaryError):
        NatsConfigPublisher(url, mesh.control.context(), lambda s, g: None, timeout=1)


@pytest.mark.integration
def test_deleting_a_document_tells_its_sidecar(mesh: Mesh) -> None:
    web = mesh.sidecar(WEB, ("default", "web"))
    mesh.publish(WEB, 1, n=1)
    assert web.next_applied() == {"n": 1}
    mesh.publisher.delete(WEB)
    eventually(lambda: web.client.removed, "web.client.removed")


# ---- outbound shards on a real server ------------------------------------------------------------------------
def _outbound(**shards: bytes) -> dict[str, Any]:
    return {"shards": {namespace: sha(body) for namespace, body in shards.items()}}


@pytest.mark.integration
def test_a_sidecar_gets_the_shards_its_document_names_verified_with_the_document(mesh: Mesh) -> None:
    web = mesh.sidecar(WEB, ("default", "web"))  # connected first: the shards reach it live
    mesh.publisher.publish_shard("shop", SHOP)
    mesh.publisher.publish_shard("pay", PAY)
    mesh.publish(WEB, 1, inbound=[], outbound=_outbound(shop=SHOP, pay=PAY))
    document, shards = web.next_apply()
    assert document == {"inbound": [], "outbound": _outbound(shop=SHOP, pay=PAY)}
    assert shards == {"shop": json.loads(SHOP), "pay": json.loads(PAY)}
    assert mesh.next_ack() == (WEB, 1)


@pytest.mark.integration
def test_a_rendered_world_reaches_a_sidecar_that_connects_afterwards(mesh_factory: Callable[..., Mesh]) -> None:
    rendered = catalog.render(catalog.World(catalog.parse_all(topology.manifests())), "example.org")
    key = "shop/web-1"
    mesh = mesh_factory({key: ("shop", "web")})
    for shard_name, body in rendered.shared.items():  # the shards first, as the control plane stores them
        mesh.publisher.publish_shard(shard_name.removeprefix(catalog.SHARD_PREFIX), body)
    mesh.publisher.publish(key, 1, rendered.sidecars[key])
    car = mesh.sidecar(key, ("shop", "web"))  # reads the document and every shard by direct get
    document, shards = car.next_apply()
    assert document == json.loads(rendered.sidecars[key])
    assert shards == {name.removeprefix(catalog.SHARD_PREFIX): json.loads(body)
                      for name, body in rendered.shared.items()}
    assert set(shards) == set(document["outbound"]["shards"]) == {"shop", "pay", "legacy"}
    assert mesh.next_ack() == (key, 1)


@pytest.mark.integration
def test_a_document_waits_unacknowledged_until_every_shard_it_names_matches(mesh: Mesh) -> None:
    mesh.publisher.publish_shard("shop", SHOP)  # an older shop: not the bytes the document names
    web = mesh.sidecar(WEB, ("default", "web"))
    mesh.publish(WEB, 1, outbound=_outbound(shop=SHOP_V2, pay=PAY))  # and pay is not stored at all yet
    eventually(lambda: web.client.pending_generation == 1, "web.client.pending_generation == 1")
    assert web.applied.empty() and mesh.acks.empty() and web.client.applied_generation == 0
    mesh.publisher.publish_shard("pay", PAY)
    mesh.publisher.publish_shard("shop", SHOP_V2)
    document, shards = web.next_apply()
    assert shards == {"shop": json.loads(SHOP_V2), "pay": json.loads(PAY)}
    assert mesh.next_ack() == (WEB, 1)
    assert web.client.pending_generation == 0 and web.client.applied_generation == 1
    assert web.applied.empty() and mesh.acks.empty()  # one apply, one ack


@pytest.mark.integration
def test_a_document_waiting_for_a_shard_stored_while_its_sidecar_was_away_is_applied_once_it_is_back(
        mesh: Mesh) -> None:
    cable = Cable(int(mesh.server.url.rsplit(":", 1)[1]))
    try:
        web = mesh.sidecar(WEB, ("default", "web"), url=f"tls://127.0.0.1:{cable.port}")
        mesh.publish(WEB, 1, outbound=_outbound(shop=SHOP))
        eventually(lambda: web.client.pending_generation == 1, "web.client.pending_generation == 1")
        cable.cut()
        eventually(lambda: not web.client.connected.is_set(), "not web.client.connected.is_set()")
        mesh.publisher.publish_shard("shop", SHOP)  # its live message never reaches the sidecar
        cable.mend()
        assert web.next_apply()[1] == {"shop": json.loads(SHOP)}  # read again after the reconnect
        assert mesh.next_ack() == (WEB, 1)
    finally:
        cable.close()


@pytest.mark.integration
def test_only_a_changed_shard_is_read_again(mesh: Mesh) -> None:
    spy = mesh.spy(shard_direct_get_subject("shop"), shard_direct_get_subject("pay"), shard_subject("shop"),
                   shard_subject("pay"))
    mesh.publisher.publish_shard("shop", SHOP)
    mesh.publisher.publish_shard("pay", PAY)
    mesh.publish(WEB, 1, outbound=_outbound(shop=SHOP, pay=PAY))
    web = mesh.sidecar(WEB, ("default", "web"))  # connects afterwards: reads both shards by direct get
    _, first = web.next_apply()
    assert mesh.next_ack() == (WEB, 1)
    assert spy.count(shard_direct_get_subject("shop")) == 1 and spy.count(shard_direct_get_subject("pay")) == 1

    # the control plane stores every shard of the new world, then the documents; only shop changed
    mesh.publisher.publish_shard("shop", SHOP_V2)
    mesh.publisher.publish_shard("pay", PAY)  # the same bytes: not stored again
    mesh.publish(WEB, 2, outbound=_outbound(shop=SHOP_V2, pay=PAY))
    _, second = web.next_apply()
    assert mesh.next_ack() == (WEB, 2)
    assert second == {"shop": json.loads(SHOP_V2), "pay": json.loads(PAY)}
    assert second["pay"] is first["pay"]  # held, not read and parsed again
    assert spy.count(shard_direct_get_subject("pay")) == 1  # not read again
    assert spy.count(shard_subject("pay")) == 1 and spy.count(shard_subject("shop")) == 2  # pay not stored again
    # the new shop came live, or by one direct get if the document was handled before the shard's message
    assert spy.count(shard_direct_get_subject("shop")) <= 2


@pytest.mark.integration
def test_every_sidecar_identity_may_read_every_shard_none_may_write_one_and_a_stranger_gets_nothing(
        mesh: Mesh) -> None:
    mesh.publisher.publish_shard("shop", SHOP)
    mesh.publish(API, 1, secret="api's")
    stranger = mesh.pki.svid("default", "stranger")

    async def attempt(svid: Svid) -> None:
        errors: asyncio.Queue[Exception] = asyncio.Queue()
        nc = await _raw(mesh.server.url, svid.context(), errors, inbox_prefix(svid.spiffe_id))
        try:
            got = await nc.request(shard_direct_get_subject("shop"), b"", timeout=WAIT)
            assert got.data == SHOP
            missing = await nc.request(shard_direct_get_subject("nowhere"), b"", timeout=WAIT)
            assert missing.headers and missing.headers.get("Status") == "404"
            # a wildcard in the direct-get subject answers with the last shard, and only ever a shard
            some = await nc.request(SHARD_DIRECT_GET_WILDCARD, b"", timeout=WAIT)
            assert some.headers and some.headers.get("Nats-Subject") == shard_subject("shop") and some.data == SHOP
            live = await nc.subscribe(SHARD_WILDCARD)
            await nc.flush()
            # a forged shard: refused (only the control plane stores, and documents name the digests anyway)
            await nc.publish(shard_subject("shop"), b'{"services": {"evil": {}}}')
            assert "permissions violation for publish" in await _next_error(errors)
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request("$JS.API.STREAM.MSG.GET.KV_meshloom-config", b"", timeout=1)
            assert "permissions violation for publish" in await _next_error(errors)
            assert errors.empty() and live.delivered == 0
        finally:
            await nc.close()

    for who in (("default", "web"), ("shop", "cart")):  # two identities, neither of them the namespace's
        asyncio.run(attempt(mesh.svid(*who)))

    _assert_unauthorised(mesh.server.url, stranger.context())


@pytest.mark.integration
def test_the_publisher_stores_a_shard_again_unless_this_connection_saw_those_bytes_stored(mesh: Mesh) -> None:
    spy = mesh.spy(shard_subject("shop"))
    mesh.publisher.publish_shard("shop", SHOP)
    mesh.publisher.publish_shard("shop", SHOP)
    assert spy.count(shard_subject("shop")) == 1
    mesh.publisher.delete_shard("shop")
    assert spy.count(shard_subject("shop")) == 2  # the delete marker
    mesh.publisher.publish_shard("shop", SHOP)  # forgotten by the delete: stored again
    assert spy.count(shard_subject("shop")) == 3
    with pytest.raises(PermanentError):
        mesh.publisher.publish_shard("shop", b"not json")

    cable = Cable(int(mesh.server.url.rsplit(":", 1)[1]))
    publisher = NatsConfigPublisher(f"tls://127.0.0.1:{cable.port}", mesh.control.context(), lambda s, g: None,
                                    inbox=inbox_prefix(mesh.control.spiffe_id))
    try:
        publisher.publish_shard("shop", SHOP_V2)
        publisher.publish_shard("shop", SHOP_V2)
        assert spy.count(shard_subject("shop")) == 4
        cable.cut()
        eventually(lambda: not publisher.connected(), "not publisher.connected()")
        with pytest.raises(TemporaryError):
            publisher.publish_shard("shop", SHOP_V2)
        cable.mend()
        eventually(publisher.connected, "publisher.connected")
        publisher.publish_shard("shop", SHOP_V2)  # the server may have come back with another store
        assert spy.count(shard_subject("shop")) == 5
    finally:
        publisher.close()
        cable.close()


@pytest.mark.integration
def test_a_server_left_running_by_a_killed_control_plane_is_stopped_before_a_new_one_starts(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    cert = pki.server()
    control = pki.svid(*CONTROL)

    def server() -> NatsServer:
        return NatsServer(tmp_path / "nats", cert=cert.cert, key=cert.key, ca=pki.ca,
                          control_plane=control.spiffe_id)

    orphan = server()
    orphan.start()
    left = orphan.pid  # its owner dies without stopping it, as under SIGKILL
    successor = server()
    successor.start()
    try:
        assert orphan._proc is not None and orphan._proc.wait(timeout=WAIT) is not None
        assert successor.pid != left and successor.running()
    finally:
        successor.stop()
        orphan.stop()


@pytest.mark.integration
def test_the_mesh_nats_listens_on_the_port_it_is_given_with_a_certificate_for_every_name_it_is_dialled_by(
        tmp_path: Path) -> None:
    import socket

    from cryptography import x509

    from actions.ca import FakeCertificateAuthority, der_certificates
    from actions.clock import SystemClock
    from actions.meshnats import MeshNats

    clock = SystemClock()
    ca = FakeCertificateAuthority(clock)
    ca.generate("1", 3600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    names = ("meshloom-nats.meshloom.svc", "localhost", "meshloom-nats.meshloom.svc", "meshloom-nats")
    mesh = MeshNats(ca, "example.org", tmp_path / "nats", der_certificates(ca.trust_anchors(("1",))),
                    lambda s, g: None, host="127.0.0.1", port=port, server_names=names)
    try:
        assert mesh.url == f"tls://127.0.0.1:{port}"
        assert f'listen: "127.0.0.1:{port}"' in mesh.server.config_path.read_text()

        def sans() -> list[str]:
            cert = x509.load_pem_x509_certificate(mesh.cert.read_bytes())
            return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName)

        # `localhost` (what the control plane's own publisher verifies) first, each name once.
        assert sans() == ["localhost", "meshloom-nats.meshloom.svc", "meshloom-nats"]
        assert mesh.renew_if_due(clock.now() + (mesh.not_after - mesh.not_before))  # a renewal keeps them
        assert sans() == ["localhost", "meshloom-nats.meshloom.svc", "meshloom-nats"]
        mesh.publish("default/web-1", 1, b'{"spiffeId": "spiffe://example.org/ns/default/sa/web"}')  # still serves
    finally:
        mesh.close()
