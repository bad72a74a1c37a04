"""The node agent against the real py-spiffe client, over real gRPC on real unix sockets."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from spiffe import WorkloadApiClient, X509Source, X509Svid
from spiffe._proto import workload_pb2, workload_pb2_grpc

from actions.errors import PermanentError, TemporaryError
from actions.nodeagent import (
    DirectoryDelivery,
    FakeSvidDelivery,
    NodeAgent,
    SvidMaterial,
    endpoint_socket,
    escape_owner,
    follow_directory,
    socket_path,
)
from tests.support.pki import Authority, Leaf
from tests.support.wait import eventually as wait_for

WAIT = 10.0  # generous: only a broken agent ever waits this long
TRUST_DOMAIN = "example.org"
HEADER = (("workload.spiffe.io", "true"),)


@pytest.fixture(scope="module")
def root() -> Authority:
    return Authority.root()


@pytest.fixture(scope="module")
def issuer(root: Authority) -> Authority:
    return root.intermediate()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[NodeAgent]:
    with NodeAgent(tmp_path / "agent") as agent:
        yield agent


def spiffe_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{name}"


def material(cert: str, leaf: Leaf, name: str) -> SvidMaterial:
    return SvidMaterial(cert=cert, spiffe_id=spiffe_id(name), chain=leaf.chain, key=leaf.key_der,
                        not_after=leaf.not_after)


def raw_stream(path: Path, method: str = "FetchX509SVID", metadata: tuple[tuple[str, str], ...] = HEADER,
               ) -> tuple[grpc.Channel, Iterator[object]]:
    channel = grpc.insecure_channel(f"unix:{path}")
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    request = workload_pb2.X509SVIDRequest() if method == "FetchX509SVID" else workload_pb2.X509BundlesRequest()
    return channel, getattr(stub, method)(request, metadata=metadata, timeout=WAIT)


def serial_of(response: object) -> int:
    """The leaf's serial number, parsed by py-spiffe as a client would."""
    svid = response.svids[0]  # type: ignore[attr-defined]
    return X509Svid.parse_raw(svid.x509_svid, svid.x509_svid_key).leaf.serial_number


# ---- serving ---------------------------------------------------------------------------------------------------
def test_a_workload_fetches_its_svid_and_the_trust_bundle_with_the_py_spiffe_client(
        agent: NodeAgent, root: Authority, issuer: Authority) -> None:
    leaf = issuer.leaf(spiffe_id("web"), "web.default.svc")
    agent.publish_bundle(TRUST_DOMAIN, (root.der,))
    agent.deliver("default/web", material("default/web/1", leaf, "web"))
    path = agent.add_workload("default/web")

    with WorkloadApiClient(endpoint_socket(path)) as client:
        svid = client.fetch_x509_svid(timeout=WAIT)
        bundles = client.fetch_x509_bundles(timeout=WAIT)
        context = client.fetch_x509_context(timeout=WAIT)

    assert str(svid.spiffe_id) == spiffe_id("web")
    assert svid.leaf.serial_number == leaf.serial
    assert [c.serial_number for c in svid.cert_chain] == [leaf.serial, issuer.cert.serial_number]
    assert svid.private_key.public_key().public_numbers() == leaf.key.public_key().public_numbers()
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None and [c.serial_number for c in bundle.x509_authorities] == [root.cert.serial_number]
    own = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert own is not None and [c.serial_number for c in own.x509_authorities] == [root.cert.serial_number]


def test_the_svid_response_carries_the_wire_format_and_no_federated_bundles(
        agent: NodeAgent, root: Authority, issuer: Authority) -> None:
    leaf = issuer.leaf(spiffe_id("web"))
    agent.publish_bundle(f"spiffe://{TRUST_DOMAIN}", (root.der,))
    agent.deliver("default/web", material("default/web/1", leaf, "web"))
    path = agent.add_workload("default/web")
    channel, stream = raw_stream(path)
    with channel:
        response = next(stream)
    channel, stream = raw_stream(path, "FetchX509Bundles")
    with channel:
        bundle_response = next(stream)

    (svid,) = response.svids  # type: ignore[attr-defined]
    assert svid.spiffe_id == spiffe_id("web")
    assert svid.x509_svid == b"".join(leaf.chain)
    assert svid.x509_svid_key == leaf.key_der
    assert svid.bundle == root.der
    assert dict(response.federated_bundles) == {}  # type: ignore[attr-defined]
    assert dict(bundle_response.bundles) == {f"spiffe://{TRUST_DOMAIN}": root.der}  # type: ignore[attr-defined]


def test_an_x509_source_receives_a_rotated_svid_on_its_open_stream(
        agent: NodeAgent, root: Authority, issuer: Authority) -> None:
    first, second = issuer.leaf(spiffe_id("web")), issuer.leaf(spiffe_id("web"))
    agent.publish_bundle(TRUST_DOMAIN, (root.der,))
    agent.deliver("default/web", material("default/web/1", first, "web"))
    path = agent.add_workload("default/web")

    source = X509Source(socket_path=endpoint_socket(path), timeout_in_seconds=WAIT)
    try:
        assert source.get_x509_context().default_svid.leaf.serial_number == first.serial
        rotated = threading.Event()
        source.subscribe_for_updates(rotated.set)

        agent.deliver("default/web", material("default/web/2", second, "web"))

        assert rotated.wait(WAIT)
        assert source.get_x509_context().default_svid.leaf.serial_number == second.serial
        assert agent.open_streams("default/web") == 1  # the same stream, not a reconnection
    finally:
        source.close()


def test_a_rotation_and_a_new_bundle_arrive_on_the_same_raw_stream(
        agent: NodeAgent, root: Authority, issuer: Authority) -> None:
    first, second = issuer.leaf(spiffe_id("web")), issuer.leaf(spiffe_id("web"))
    next_root = Authority.root("next root")
    agent.publish_bundle(TRUST_DOMAIN, (root.der,))
    agent.deliver("default/web", material("default/web/1", first, "web"))
    channel, stream = raw_stream(agent.add_workload("default/web"))
    with channel:
        assert serial_of(next(stream)) == first.serial
        agent.deliver("default/web", material("default/web/2", second, "web"))
        assert serial_of(next(stream)) == second.serial
        agent.publish_bundle(TRUST_DOMAIN, (root.der, next_root.der))
        assert next(stream).svids[0].bundle == root.der + next_root.der  # type: ignore[attr-defined]


def test_a_workload_without_an_svid_keeps_its_stream_open_until_one_is_delivered(
        agent: NodeAgent, root: Authority, issuer: Authority) -> None:
    leaf = issuer.leaf(spiffe_id("web"))
    path = agent.add_workload("default/web")
    agent.publish_bundle(TRUST_DOMAIN, (root.der,))
    created: list[X509Source] = []
    waiting = threading.Thread(target=lambda: created.append(X509Source(socket_path=endpoint_socket(path),
                                                                        timeout_in_seconds=WAIT)))
    waiting.start()
    try:
        wait_for(lambda: agent.open_streams("default/web") == 1, "the source's stream")
        agent.deliver("default/web", material("default/web/1", leaf, "web"))
        waiting.join(WAIT)
        assert created and created[0].get_x509_context().default_svid.leaf.serial_number == leaf.serial
    finally:
        waiting.join(WAIT)
        for source in created:
            source.close()


# ---- refusing --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["FetchX509SVID", "FetchX509Bundles"])
def test_a_call_without_the_security_header_is_refused_with_invalid_argument(
        agent: NodeAgent, root: Authority, issuer: Authority, method: str) -> None:
    agent.publish_bundle(TRUST_DOMAIN, (root.der,))
    agent.deliver("default/web", material("default/web/1", issuer.leaf(spiffe_id("web")), "web"))
    channel, stream = raw_stream(agent.add_workload("default/web"), method, metadata=())
    received = []
    with channel, pytest.raises(grpc.RpcError) as refused:
        received.extend(stream)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert received == []


def test_jwt_svids_are_unimplemented(agent: NodeAgent) -> None:
    path = agent.add_workload("default/web")
    with grpc.insecure_channel(f"unix:{path}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER, timeout=WAIT)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_each_socket_serves_only_its_own_workloads_svid(
        agent: NodeAgent, root: Authority, issuer: Authority) -> None:
    web, db = issuer.leaf(spiffe_id("web")), issuer.leaf(spiffe_id("db"))
    agent.publish_bundle(TRUST_DOMAIN, (root.der,))
    agent.deliver("default/web", material("default/web/1", web, "web"))
    agent.deliver("default/db", material("default/db/1", db, "db"))
    web_path, db_path = agent.add_workload("default/web"), agent.add_workload("default/db")

    assert web_path != db_path
    with WorkloadApiClient(endpoint_socket(web_path)) as client:
        assert [s.leaf.serial_number for s in client.fetch_x509_svids(timeout=WAIT)] == [web.serial]
    with WorkloadApiClient(endpoint_socket(db_path)) as client:
        assert [s.leaf.serial_number for s in client.fetch_x509_svids(timeout=WAIT)] == [db.serial]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A socket directory other uids can traverse to (pytest's tmp_path lives under a root-only 0700 folder)."""
    directory = Path(tempfile.mkdtemp(prefix="meshloom-na-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving sockets to other uids needs root")
def test_another_uid_cannot_reach_a_workloads_socket(shared_dir: Path) -> None:
    web_uid, db_uid = 40001, 40002
    with NodeAgent(shared_dir / "agent") as agent:
        web_path = agent.add_workload("default/web", uid=web_uid)
        db_path = agent.add_workload("default/db", uid=db_uid)

        for path, uid in ((web_path, web_uid), (db_path, db_uid)):
            folder = os.stat(path.parent)
            assert (folder.st_uid, stat.S_IMODE(folder.st_mode)) == (uid, 0o700)
            assert os.stat(path).st_uid == uid
        assert connect_as(web_uid, [web_path, db_path]) == ["connected", "PermissionError"]


def connect_as(uid: int, paths: list[Path]) -> list[str]:
    """Connects to each socket from a child process that runs as `uid` (fork, then setuid: no exec, so no need for
    an interpreter that `uid` may read)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no gRPC, only the socket calls, then _exit
        outcomes = []
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for path in paths:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    try:
                        sock.connect(str(path))
                        outcomes.append("connected")
                    except OSError as exc:
                        outcomes.append(type(exc).__name__)
            os.write(write_end, ",".join(outcomes).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer.split(",") if answer else []


# ---- withdrawing, hooks, lifecycle -----------------------------------------------------------------------------
def test_withdrawing_the_current_svid_ends_its_stream_as_spire_does_and_a_new_stream_waits(
        agent: NodeAgent, root: Authority, issuer: Authority) -> None:
    first, second, third = (issuer.leaf(spiffe_id("web")) for _ in range(3))
    agent.publish_bundle(TRUST_DOMAIN, (root.der,))
    agent.deliver("default/web", material("default/web/1", first, "web"))
    path = agent.add_workload("default/web")
    channel, stream = raw_stream(path)
    with channel:
        assert serial_of(next(stream)) == first.serial
        agent.withdraw("default/web", "default/web/0")  # not the current one: nothing happens
        agent.deliver("default/web", material("default/web/2", second, "web"))
        assert serial_of(next(stream)) == second.serial

        agent.withdraw("default/web", "default/web/2")
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]

    channel, stream = raw_stream(path)
    with channel:
        wait_for(lambda: agent.open_streams("default/web") == 1, "the new stream")
        agent.deliver("default/web", material("default/web/3", third, "web"))
        assert serial_of(next(stream)) == third.serial  # nothing was served in between


def test_on_served_fires_once_per_certificate_when_it_was_really_sent(
        tmp_path: Path, root: Authority, issuer: Authority) -> None:
    served: list[tuple[str, str]] = []
    agent = NodeAgent(tmp_path / "agent", on_served=lambda owner, cert: served.append((owner, cert)))
    first, second = issuer.leaf(spiffe_id("web")), issuer.leaf(spiffe_id("web"))
    with agent:
        agent.publish_bundle(TRUST_DOMAIN, (root.der,))
        agent.deliver("default/web", material("default/web/1", first, "web"))
        path = agent.add_workload("default/web")
        assert served == []  # delivered, but no workload has asked for it yet

        streams = [raw_stream(path) for _ in range(2)]
        for _, stream in streams:
            assert serial_of(next(stream)) == first.serial
        agent.deliver("default/web", material("default/web/1", first, "web"))  # the same again: nothing new to send
        agent.deliver("default/web", material("default/web/2", second, "web"))
        for _, stream in streams:
            assert serial_of(next(stream)) == second.serial
        wait_for(lambda: len(served) >= 2, "on_served")
        for channel, _ in streams:
            channel.close()
    # stop() has run every hook it had queued
    assert served == [("default/web", "default/web/1"), ("default/web", "default/web/2")]


def test_stopping_ends_streams_with_unavailable_and_removes_sockets_and_threads(
        tmp_path: Path, root: Authority, issuer: Authority) -> None:
    agent = NodeAgent(tmp_path / "agent")
    agent.start()
    agent.publish_bundle(TRUST_DOMAIN, (root.der,))
    agent.deliver("default/web", material("default/web/1", issuer.leaf(spiffe_id("web")), "web"))
    path = agent.add_workload("default/web")
    channel, stream = raw_stream(path)
    with channel:
        next(stream)
        agent.stop()
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
    # UNAVAILABLE, which clients retry (py-spiffe gives up for good on CANCELLED and INVALID_ARGUMENT)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert not path.exists() and not path.parent.exists()
    assert [t.name for t in threading.enumerate() if t.name.startswith("meshloom-nodeagent")] == []

    agent.start()  # and it starts again
    try:
        with WorkloadApiClient(endpoint_socket(agent.add_workload("default/web"))) as client:
            assert str(client.fetch_x509_svid(timeout=WAIT).spiffe_id) == spiffe_id("web")
    finally:
        agent.stop()


def test_removing_a_workload_closes_its_socket_and_ends_its_streams(
        agent: NodeAgent, root: Authority, issuer: Authority) -> None:
    agent.publish_bundle(TRUST_DOMAIN, (root.der,))
    path = agent.add_workload("default/web")
    channel, stream = raw_stream(path, "FetchX509Bundles")
    with channel:
        next(stream)
        agent.remove_workload("default/web")
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert not path.exists() and agent.workloads() == {}


def test_bad_material_and_empty_bundles_are_refused_for_good(agent: NodeAgent, issuer: Authority) -> None:
    leaf = issuer.leaf(spiffe_id("web"))
    with pytest.raises(PermanentError):
        agent.deliver("default/web", SvidMaterial("default/web/1", "https://example.org/web", leaf.chain,
                                                  leaf.key_der, leaf.not_after))
    with pytest.raises(PermanentError):
        agent.deliver("default/web", SvidMaterial("default/web/1", spiffe_id("web"), (), leaf.key_der,
                                                  leaf.not_after))
    with pytest.raises(PermanentError):
        agent.publish_bundle(TRUST_DOMAIN, ())


# ---- socket names ----------------------------------------------------------------------------------------------
def test_socket_names_are_distinct_safe_and_short_enough_for_a_unix_socket(tmp_path: Path) -> None:
    owners = ["default/web", "default_web", "default+5Fweb", ".", "..", "a/../../b", "ns/" + "p" * 300,
              "ns/" + "p" * 299 + "q", "ünïcode/pod"]
    names = [escape_owner(owner, 60) for owner in owners]
    assert len(set(names)) == len(names)
    assert all("/" not in n and "%" not in n and not n.startswith(".") and len(n) <= 60 for n in names)
    assert escape_owner("default/web") == "default_web"
    for owner in owners:
        assert len(os.fsencode(socket_path(tmp_path, owner))) <= 107


# ---- a node agent in another process ---------------------------------------------------------------------------
def test_directory_delivery_reaches_a_py_spiffe_client_through_a_live_agent(
        agent: NodeAgent, tmp_path: Path, root: Authority, issuer: Authority) -> None:
    first, second = issuer.leaf(spiffe_id("web")), issuer.leaf(spiffe_id("web"))
    shared = tmp_path / "shared"
    delivery = DirectoryDelivery(shared)
    delivery.publish_bundle(TRUST_DOMAIN, (root.der,))
    delivery.deliver("default/web", material("default/web/1", first, "web"))
    svid_file = shared / "workloads" / "default_web" / "svid.json"
    assert stat.S_IMODE(os.stat(svid_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(shared / "bundle.json").st_mode) == 0o600

    path = agent.add_workload("default/web")
    stop = threading.Event()
    follower = threading.Thread(target=follow_directory, args=(agent, shared, stop, 0.02))
    follower.start()
    try:
        source = X509Source(socket_path=endpoint_socket(path), timeout_in_seconds=WAIT)
        try:
            assert source.get_x509_context().default_svid.leaf.serial_number == first.serial
            rotated = threading.Event()
            source.subscribe_for_updates(rotated.set)
            delivery.deliver("default/web", material("default/web/2", second, "web"))
            assert rotated.wait(WAIT)
            assert source.get_x509_context().default_svid.leaf.serial_number == second.serial
        finally:
            source.close()

        channel, stream = raw_stream(path)
        with channel:
            assert serial_of(next(stream)) == second.serial
            delivery.withdraw("default/web", "default/web/1")  # superseded: stays
            assert svid_file.exists()
            delivery.withdraw("default/web", "default/web/2")
            assert not svid_file.exists()
            with pytest.raises(grpc.RpcError) as ended:
                next(stream)
            assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    finally:
        stop.set()
        follower.join(WAIT)


def test_directory_delivery_reports_an_unwritable_directory_as_temporary(
        tmp_path: Path, issuer: Authority) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(TemporaryError):
        DirectoryDelivery(blocker).deliver("default/web", material("default/web/1", issuer.leaf(spiffe_id("web")),
                                                                   "web"))


def test_the_fake_keeps_what_an_agent_would_serve(root: Authority, issuer: Authority) -> None:
    fake = FakeSvidDelivery()
    leaf = issuer.leaf(spiffe_id("web"))
    fake.deliver("default/web", material("default/web/1", leaf, "web"))
    fake.publish_bundle(TRUST_DOMAIN, (root.der,))
    fake.withdraw("default/web", "default/web/0")
    assert fake.current == {"default/web": "default/web/1"} and fake.bundle == (root.der,)
    fake.withdraw("default/web", "default/web/1")
    assert fake.current == {} and fake.delivered == [("default/web", "default/web/1")]
    fake.down = True
    with pytest.raises(TemporaryError):
        fake.deliver("default/web", material("default/web/2", leaf, "web"))
