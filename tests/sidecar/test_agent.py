"""The sidecar agent's own logic: readiness, applies, rotations, draining. The Workload API is the real node agent
(in-process, real gRPC and py-spiffe); HAProxy and the NATS feed are fakes that behave, so each step is watched
exactly. The whole thing against the real control plane, NATS and HAProxy is in tests/integration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from actions.netns import HostNetwork
from actions.netns import run as run_in_pod
from actions.nodeagent import NodeAgent, SvidMaterial, endpoint_socket
from catalog.subjects import inbox_prefix
from sidecar.agent import (
    AppProbe,
    AppProbesError,
    Missing,
    SidecarAgent,
    SidecarError,
    SidecarSettings,
    _haproxy,
    from_inside_pod,
    parse_app_probes,
)
from sidecar.haproxy import ProxyPaths, ProxyPorts
from tests.support.pki import Authority, Leaf
from tests.support.wait import eventually

WAIT = 10.0  # only a broken agent waits this long
KEY = "shop/web-1"
SPIFFE_ID = "spiffe://example.org/ns/shop/sa/web"


# ---- fakes that behave ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeConfig:
    """What a render gives the proxy: the document's text, and its structure (equal -> no reload)."""

    text: str
    structure: str


def fake_render(document: dict[str, Any], shards: dict[str, dict[str, Any]], paths: ProxyPaths,
                ports: ProxyPorts) -> FakeConfig:
    if document.get("broken"):
        raise ValueError("cannot render")
    return FakeConfig(json.dumps([document, shards], sort_keys=True), str(document.get("structure", "one")))


class FakeProxy:
    """HAProxy as the agent sees it: started with a config and an SVID, then applied to (runtime when the structure
    is unchanged, else reload), given new SVIDs, stopped with a drain. `gate` holds apply/stop until it is set."""

    instances: list[FakeProxy]

    def __init__(self, paths: ProxyPaths, uid: int | None, gid: int | None) -> None:
        self.paths, self.uid, self.gid = paths, uid, gid
        self.config: FakeConfig | None = None
        self.cert: bytes | None = None
        self.ca: bytes | None = None
        self.calls: list[str] = []
        self.svids: list[bytes] = []
        self.drained: float | None = None
        self.alive = False
        self.refuse: str | None = None  # the next call of that name raises
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.pid: int | None = None

    @property
    def running(self) -> bool:
        return self.alive

    def worker_pids(self) -> list[int]:
        return [4321] if self.alive else []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        self.entered.set()
        assert self.gate.wait(WAIT)
        if self.refuse == name:
            self.refuse = None
            raise RuntimeError(f"HAProxy refused {name}")

    def start(self, config: FakeConfig, cert_pem: bytes, ca_pem: bytes) -> None:
        self._call("start")
        self.config, self.cert, self.ca, self.alive, self.pid = config, cert_pem, ca_pem, True, 1234

    def apply(self, config: FakeConfig) -> str:
        self._call("apply")
        assert self.alive and self.config is not None
        outcome = ("unchanged" if config == self.config else
                   "runtime" if config.structure == self.config.structure else "reload")
        self.config = config
        return outcome

    def update_svid(self, cert_pem: bytes, ca_pem: bytes) -> None:
        self._call("update_svid")
        self.cert, self.ca = cert_pem, ca_pem
        self.svids.append(cert_pem)

    def stop(self, drain_seconds: float = 20.0) -> None:
        self._call("stop")
        self.drained, self.alive = drain_seconds, False


class FakeFeed:
    """The NATS configuration client as the agent sees it: `deliver` plays a document arriving, and acknowledges it
    only when the agent's apply returned, as `ConfigClient` does."""

    def __init__(self, url: str, sidecar: str, ssl_context: ssl.SSLContext, apply: Callable[..., None],
                 inbox: str, *, resync_interval: float, tls_hostname: str | None,
                 on_error: Callable[[Exception], None] | None) -> None:
        self.url, self.sidecar, self.inbox, self.tls_hostname = url, sidecar, inbox, tls_hostname
        self.contexts: list[tuple[ssl.SSLContext, bool]] = [(ssl_context, False)]
        self._apply = apply
        self.on_error = on_error
        self.applied_generation = self.acked_generation = self.pending_generation = 0
        self.removed = False
        self.connected = threading.Event()
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True
        self.connected.set()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopped = True
        self.connected.clear()

    def use_tls(self, ssl_context: ssl.SSLContext, *, reconnect: bool = False) -> None:
        self.contexts.append((ssl_context, reconnect))

    def deliver(self, generation: int, document: dict[str, Any]) -> bool:
        try:
            self._apply(document, {})
        except Exception:
            return False
        self.applied_generation = self.acked_generation = generation
        return True


@dataclass
class Rig:
    """A node agent serving one workload, and a sidecar agent beside it with a fake proxy and feed."""

    tmp_path: Path
    node: NodeAgent
    root: Authority
    issuer: Authority
    socket: Path
    now: list[datetime] = field(default_factory=lambda: [datetime.now(UTC)])
    proxies: list[FakeProxy] = field(default_factory=list)
    feeds: list[FakeFeed] = field(default_factory=list)
    agents: list[SidecarAgent] = field(default_factory=list)
    serial: int = 0
    refuse_start: bool = False  # the next HAProxy made refuses to start

    def issue(self, leaf: Leaf | None = None) -> Leaf:
        leaf = leaf or self.issuer.leaf(SPIFFE_ID, "web-1.shop.pod")
        self.serial += 1
        self.node.deliver(KEY, SvidMaterial(f"{KEY}/{self.serial}", SPIFFE_ID, leaf.chain, leaf.key_der,
                                            leaf.not_after))
        return leaf

    def agent(self, **overrides: Any) -> SidecarAgent:
        settings = SidecarSettings(**{
            "sidecar": KEY, "workload_socket": endpoint_socket(self.socket), "nats_url": "tls://127.0.0.1:4222",
            "run_dir": self.tmp_path / "run", "admin_port": 0, "admin_host": "127.0.0.1", "drain_seconds": 3.0,
            "supervise_interval": 3600.0, **overrides})

        def proxy(paths: ProxyPaths, uid: int | None, gid: int | None) -> FakeProxy:
            made = FakeProxy(paths, uid, gid)
            if self.refuse_start:
                made.refuse, self.refuse_start = "start", False
            self.proxies.append(made)
            return made

        def feed(*args: Any, **kwargs: Any) -> FakeFeed:
            made = FakeFeed(*args, **kwargs)
            self.feeds.append(made)
            return made

        agent = SidecarAgent(settings, proxy_factory=proxy, render_config=fake_render,  # type: ignore[arg-type]
                             config_factory=feed, clock=lambda: self.now[0])
        self.agents.append(agent)
        agent.start()
        return agent

    @property
    def feed(self) -> FakeFeed:
        eventually(lambda: bool(self.feeds), "the agent to connect to NATS")
        return self.feeds[-1]

    @property
    def proxy(self) -> FakeProxy:
        return self.proxies[-1]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    root = Authority.root()
    node = NodeAgent(tmp_path / "node")
    node.start()
    node.publish_bundle("example.org", (root.der,))
    rig = Rig(tmp_path, node, root, root.intermediate(), node.add_workload(KEY))
    try:
        yield rig
    finally:
        for agent in rig.agents:
            for proxy in rig.proxies:
                proxy.gate.set()
            agent.stop()
        node.stop()


def get(agent: SidecarAgent, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}{path}", timeout=WAIT) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    return status, (json.loads(body) if body.startswith(b"{") else body.decode())


def post(agent: SidecarAgent, path: str) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{agent.admin_port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return response.status, json.loads(response.read())


def serial_in(pem: bytes) -> int:
    return x509.load_pem_x509_certificates(pem.split(b"-----BEGIN PRIVATE KEY-----")[0])[0].serial_number


# ---- readiness -------------------------------------------------------------------------------------------------
def test_readiness_names_what_is_missing_until_svid_configuration_and_proxy_are_all_there(rig: Rig) -> None:
    agent = rig.agent()
    status, body = get(agent, "/ready")
    assert status == 503 and body["missing"] == [Missing.SVID, Missing.CONFIG, Missing.PROXY]
    assert "Workload API" in body["detail"][Missing.SVID]
    assert get(agent, "/live")[0] == 200

    leaf = rig.issue()
    eventually(lambda: agent.svid is not None, "the SVID")
    status, body = get(agent, "/ready")
    assert status == 503 and body["missing"] == [Missing.CONFIG, Missing.PROXY]
    assert rig.feed.started and rig.feed.inbox == inbox_prefix(SPIFFE_ID) and rig.feed.tls_hostname == "localhost"

    assert rig.feed.deliver(1, {"sidecar": KEY})
    status, body = get(agent, "/ready")
    assert status == 200 and body == {"ready": True, "missing": [], "detail": {}}

    rig.proxy.alive = False  # HAProxy died (the supervisor is slowed down in this test)
    assert get(agent, "/ready")[1]["missing"] == [Missing.PROXY]
    rig.proxy.alive = True
    rig.now[0] = leaf.not_after + timedelta(seconds=1)
    status, body = get(agent, "/ready")
    assert status == 503 and body["missing"] == [Missing.SVID] and "expired" in body["detail"][Missing.SVID]


def test_a_configuration_waiting_for_its_shards_is_named_as_what_readiness_misses(rig: Rig) -> None:
    agent = rig.agent()
    rig.issue()
    rig.feed.pending_generation = 3
    eventually(lambda: agent.svid is not None, "the SVID")
    assert get(agent, "/ready")[1]["detail"][Missing.CONFIG] == "generation 3 waits for its outbound shards"


# ---- applying ---------------------------------------------------------------------------------------------------
def test_the_first_document_starts_haproxy_with_the_svid_and_later_ones_are_applied_to_it(rig: Rig) -> None:
    agent = rig.agent()
    leaf = rig.issue()
    feed = rig.feed
    assert feed.deliver(1, {"n": 1})
    proxy = rig.proxy
    assert proxy.calls == ["start"] and serial_in(proxy.cert or b"") == leaf.serial
    assert proxy.ca == rig.root.cert.public_bytes(Encoding.PEM)
    assert feed.deliver(2, {"n": 2})  # same structure: runtime API
    assert feed.deliver(3, {"n": 3, "structure": "two"})  # a new structure: reload
    assert feed.deliver(4, {"n": 3, "structure": "two"})  # nothing changed
    assert proxy.calls == ["start", "apply", "apply", "apply"] and len(rig.proxies) == 1

    status = get(agent, "/status")[1]
    assert status["generation"] == 4 and status["acked"] == 4
    assert (status["reloads"], status["runtime_updates"], status["proxy_starts"]) == (1, 1, 1)
    assert status["spiffe_id"] == SPIFFE_ID and status["serial"] == format(leaf.serial, "x")
    assert status["proxy_pid"] == 1234 and status["worker_pids"] == [4321]
    metrics = get(agent, "/metrics")[1]
    assert "meshloom_sidecar_config_generation 4.0" in metrics
    assert 'meshloom_sidecar_config_applies_total{outcome="reload"} 1.0' in metrics
    assert 'meshloom_sidecar_config_applies_total{outcome="unchanged"} 1.0' in metrics
    assert "meshloom_sidecar_proxy_reloads_total 1.0" in metrics
    assert "meshloom_sidecar_ready 1.0" in metrics
    left = float(next(line.split()[1] for line in metrics.splitlines()
                      if line.startswith("meshloom_sidecar_svid_expiry_seconds ")))
    assert 0 < left <= 3600


def test_apply_returns_only_once_haproxy_runs_the_configuration_so_the_ack_follows_it(rig: Rig) -> None:
    rig.agent()
    rig.issue()
    feed = rig.feed
    assert feed.deliver(1, {"n": 1})
    proxy = rig.proxy
    proxy.gate.clear()
    proxy.entered.clear()
    delivered: list[bool] = []
    thread = threading.Thread(target=lambda: delivered.append(feed.deliver(2, {"n": 2})))
    thread.start()
    assert proxy.entered.wait(WAIT)
    assert delivered == [] and feed.acked_generation == 1  # HAProxy has not taken it: no acknowledgement yet
    proxy.gate.set()
    thread.join(WAIT)
    assert delivered == [True] and feed.acked_generation == 2


@pytest.mark.parametrize("refused", ["start", "apply", "render"])
def test_a_configuration_haproxy_does_not_take_is_not_acknowledged_and_the_next_read_applies_it(
        rig: Rig, refused: str) -> None:
    agent = rig.agent()
    rig.issue()
    feed = rig.feed
    if refused == "apply":
        assert feed.deliver(1, {"n": 1})
        rig.proxy.refuse = "apply"
    elif refused == "start":
        rig.refuse_start = True
    document = {"n": 2, "broken": refused == "render"}
    assert not feed.deliver(2, document)
    assert feed.acked_generation == (1 if refused == "apply" else 0)
    assert "meshloom_sidecar_config_apply_failures_total 1.0" in get(agent, "/metrics")[1]
    if refused != "render":
        assert feed.deliver(2, document)  # the resync's read applies it
        assert feed.acked_generation == 2 and get(agent, "/ready")[0] == 200


# ---- rotations --------------------------------------------------------------------------------------------------
def test_an_svid_rotation_reaches_haproxy_without_a_reload_and_nats_at_its_next_connection(rig: Rig) -> None:
    agent = rig.agent()
    first = rig.issue()
    feed = rig.feed
    assert feed.deliver(1, {"n": 1})
    proxy = rig.proxy

    second = rig.issue()
    eventually(lambda: proxy.svids != [], "the new SVID at HAProxy")
    eventually(lambda: len(feed.contexts) == 2, "the new SVID at NATS")  # handed over right after HAProxy's
    assert serial_in(proxy.svids[-1]) == second.serial != first.serial
    assert proxy.calls == ["start", "update_svid"]  # no apply, no reload, no second HAProxy
    assert len(rig.proxies) == 1 and proxy.alive
    assert [reconnect for _, reconnect in feed.contexts] == [False, False]  # the next connection presents it
    assert serial_in(Path(agent.paths.cert).read_bytes()) == second.serial  # a later reload keeps it
    status = get(agent, "/status")[1]
    assert status["serial"] == format(second.serial, "x") and status["svid_rotations"] == 1
    assert status["runtime_updates"] == 1 and status["reloads"] == 0


def test_a_new_trust_bundle_reaches_haproxy_and_nats_reconnects_under_it(rig: Rig) -> None:
    rig.agent()
    rig.issue()
    feed = rig.feed
    assert feed.deliver(1, {"n": 1})
    proxy = rig.proxy
    next_root = Authority.root("next root")

    rig.node.publish_bundle("example.org", (rig.root.der, next_root.der))
    eventually(lambda: proxy.calls[-1:] == ["update_svid"], "the new bundle at HAProxy")
    eventually(lambda: len(feed.contexts) == 2, "the new bundle at NATS")  # handed over right after HAProxy's
    roots = {c.serial_number for c in x509.load_pem_x509_certificates(proxy.ca or b"")}
    assert roots == {rig.root.cert.serial_number, next_root.cert.serial_number}
    context, reconnect = feed.contexts[-1]
    assert reconnect
    trusted = {x509.load_der_x509_certificate(der).serial_number for der in context.get_ca_certs(binary_form=True)}
    assert trusted == roots


def test_the_same_svid_served_again_changes_nothing(rig: Rig) -> None:
    agent = rig.agent()
    leaf = rig.issue()
    assert rig.feed.deliver(1, {"n": 1})
    rig.node.remove_workload(KEY)  # the stream ends; the agent opens another and gets the same SVID
    rig.node.add_workload(KEY)
    rig.issue(leaf)
    eventually(lambda: rig.node.open_streams(KEY) == 1, "the agent's new stream")
    assert rig.proxy.calls == ["start"] and agent.svid_rotations == 0 and len(rig.feed.contexts) == 1


def test_a_dead_haproxy_is_started_again_and_a_refused_svid_is_handed_over_again(rig: Rig) -> None:
    agent = rig.agent(supervise_interval=0.02)
    rig.issue()
    assert rig.feed.deliver(1, {"n": 1, "structure": "x"})
    first = rig.proxy
    first.refuse = "update_svid"
    second_leaf = rig.issue()
    eventually(lambda: first.svids != [], "the SVID handed over again")
    assert serial_in(first.svids[-1]) == second_leaf.serial

    first.alive = False
    eventually(lambda: len(rig.proxies) == 2 and rig.proxies[1].alive, "a new HAProxy")
    again = rig.proxies[1]
    assert again.config == first.config and serial_in(again.cert or b"") == second_leaf.serial
    assert get(agent, "/status")[1]["proxy_starts"] == 2


# ---- files -----------------------------------------------------------------------------------------------------
def test_the_svid_and_bundle_files_are_private_to_the_proxy_user(rig: Rig) -> None:
    root = os.geteuid() == 0
    agent = rig.agent(uid=2102 if root else None, gid=2102 if root else None)
    leaf = rig.issue()
    eventually(lambda: agent.svid is not None, "the SVID")
    cert, bundle = Path(agent.paths.cert), Path(agent.paths.ca)
    assert stat.S_IMODE(cert.stat().st_mode) == 0o600 and stat.S_IMODE(bundle.stat().st_mode) == 0o644
    assert cert.read_bytes().count(b"BEGIN CERTIFICATE") == 2 and b"BEGIN PRIVATE KEY" in cert.read_bytes()
    assert serial_in(cert.read_bytes()) == leaf.serial
    if root:
        assert (cert.stat().st_uid, cert.stat().st_gid) == (2102, 2102)
        assert agent.settings.run_dir.stat().st_uid == 2102
    assert not [p for p in agent.settings.run_dir.iterdir() if p.name.endswith(".tmp")]


# ---- stopping ----------------------------------------------------------------------------------------------------
def test_the_shutdown_endpoint_drains_haproxy_then_stops_the_agent(rig: Rig) -> None:
    agent = rig.agent()
    rig.issue()
    assert rig.feed.deliver(1, {"n": 1})
    proxy = rig.proxy
    proxy.gate.clear()  # HAProxy is still draining connections in flight
    proxy.entered.clear()

    assert post(agent, "/shutdown") == (202, {"drain_seconds": 3.0, "shutting_down": True})
    assert proxy.entered.wait(WAIT)
    status, body = get(agent, "/ready")
    assert status == 503 and body["missing"] == [Missing.DRAINING]  # the kubelet stops sending traffic during the drain
    assert rig.feed.stopped and not agent.wait(0)
    proxy.gate.set()
    assert agent.wait(WAIT)
    assert proxy.drained == 3.0 and proxy.calls[-1] == "stop"
    with pytest.raises(OSError):
        get(agent, "/live")


_FROM_POD = """
import sys, urllib.error, urllib.request
method, url = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(urllib.request.Request(url, data=b"" if method == "POST" else None,
                                                       method=method), timeout=10) as response:
        print(response.status, response.read().decode().strip())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode().strip())
"""


@pytest.mark.integration
def test_a_shutdown_from_outside_the_pod_is_refused_and_the_agent_keeps_running(
        rig: Rig, host_network: HostNetwork) -> None:
    # The admin port listens on every address, as in a pod; the client is another "pod" reaching it at the host's
    # bridge address, so its address is not loopback.
    agent = rig.agent(admin_host="0.0.0.0")
    rig.issue()
    assert rig.feed.deliver(1, {"n": 1})
    outsider = host_network.add_pod("outsider")
    base = f"http://{host_network.gateway}:{agent.admin_port}"

    for path in ("/shutdown", "/quitquitquit"):
        status, body = run_in_pod(outsider, [sys.executable, "-c", _FROM_POD, "POST", base + path]).stdout.split(
            " ", 1)
        assert status == "403"
        assert json.loads(body) == {"error": f"{path} is served only from inside the pod (loopback), not to "
                                             f"{outsider.ip}"}
    assert run_in_pod(outsider, [sys.executable, "-c", _FROM_POD, "GET", base + "/live"]).stdout.startswith("200 ")
    assert not agent.wait(0) and rig.proxy.calls[-1] != "stop" and not rig.feed.stopped
    assert get(agent, "/ready")[0] == 200  # not draining


@pytest.mark.parametrize(("host", "inside"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("192.0.2.2", False), ("::ffff:10.0.0.5", False), ("fe80::1%eth0", False), ("", False),
])
def test_only_a_loopback_client_counts_as_inside_the_pod(host: str, inside: bool) -> None:
    assert from_inside_pod(host) is inside


def test_stop_drains_once_and_a_second_stop_waits_for_the_first(rig: Rig) -> None:
    agent = rig.agent()
    rig.issue()
    assert rig.feed.deliver(1, {"n": 1})
    proxy = rig.proxy
    proxy.gate.clear()
    first = threading.Thread(target=agent.stop)
    first.start()
    assert proxy.entered.wait(WAIT)
    second = threading.Thread(target=agent.stop)
    second.start()
    second.join(0.05)
    assert second.is_alive()  # waiting for the drain in progress, not starting another
    proxy.gate.set()
    first.join(WAIT)
    second.join(WAIT)
    assert proxy.calls.count("stop") == 1 and agent.wait(0)
    assert not rig.feed.deliver(2, {"n": 2})  # a late apply is refused, so never acknowledged


def test_an_agent_stopped_before_any_svid_stops_at_once(rig: Rig) -> None:
    agent = rig.agent()
    agent.stop()
    assert agent.wait(0) and rig.proxies == [] and rig.feeds == []


# ---- settings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field_name", "value", "message"), [
    ("sidecar", "web-1", "sidecar 'web-1' is not NAMESPACE/NAME"),
    ("sidecar", "shop/web/1", "is not NAMESPACE/NAME"),
    ("workload_socket", "/run/agent.sock", "is not unix:///ABSOLUTE/PATH"),
    ("nats_url", "127.0.0.1:4222", "is not tls://HOST:PORT"),
    ("drain_seconds", -1.0, "is negative"),
])
def test_settings_refuse_what_cannot_work(tmp_path: Path, field_name: str, value: Any, message: str) -> None:
    base: dict[str, Any] = {"sidecar": KEY, "workload_socket": "unix:///run/agent.sock",
                            "nats_url": "tls://127.0.0.1:4222", "run_dir": tmp_path}
    with pytest.raises(ValueError, match=message):
        SidecarSettings(**{**base, field_name: value})


def test_an_admin_port_already_taken_is_one_clear_error(rig: Rig) -> None:
    first = rig.agent()
    with pytest.raises(SidecarError, match=rf"cannot listen on admin port 127\.0\.0\.1:{first.admin_port}"):
        rig.agent(admin_port=first.admin_port, run_dir=rig.tmp_path / "other")


# ---- the app's probes in strict mode ---------------------------------------------------------------------------
class App:
    """The workload, on loopback: answers each path with the status the test gave it (200 by default) and keeps
    what each request carried. Plain HTTP, or HTTPS under a certificate nobody trusts."""

    def __init__(self, tmp_path: Path, *, tls: bool = False) -> None:
        self.statuses: dict[str, int] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                app.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = f"app says {self.path}".encode()
                self.send_response(app.statuses.get(self.path.split("?")[0], 200))
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            leaf = Authority.root("untrusted").leaf(SPIFFE_ID, "app.local")
            cert, key = tmp_path / "app.crt", tmp_path / "app.key"
            cert.write_bytes(leaf.cert.public_bytes(Encoding.PEM))
            key.write_bytes(leaf.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def probes(**by_path: dict[str, Any]) -> dict[str, AppProbe]:
    return parse_app_probes(json.dumps({f"/app-health/app/{k}": v for k, v in by_path.items()}))


def test_an_app_probe_is_made_from_inside_the_pod_and_answered_with_the_apps_status(rig: Rig, tmp_path: Path) -> None:
    app = App(tmp_path)
    try:
        app.statuses["/sick"] = 500
        agent = rig.agent(app_probes=probes(
            readyz={"port": app.port, "path": "/healthz?full=1", "scheme": "HTTP",
                    "httpHeaders": [{"name": "X-Probe", "value": "ready"}, {"name": "Host", "value": "web.local"}]},
            livez={"port": app.port, "path": "/sick", "scheme": "HTTP"}))
        assert get(agent, "/app-health/app/readyz") == (200, "app says /healthz?full=1")
        path, headers = app.seen[-1]
        assert path == "/healthz?full=1"
        assert (headers["x-probe"], headers["host"], headers["user-agent"]) == ("ready", "web.local",
                                                                                 "kube-probe/meshloom")
        assert get(agent, "/app-health/app/livez") == (500, "app says /sick")  # a failing app: its failing status
        status, body = get(agent, "/app-health/app/startupz")  # no such probe was handed over
        assert status == 404 and body["error"] == "no app probe /app-health/app/startupz"
        assert get(agent, "/app-health/other/readyz")[0] == 404
    finally:
        app.close()
    status, body = get(agent, "/app-health/app/readyz")  # the app is gone: the probe fails, saying why
    assert status == 503 and f"127.0.0.1:{app.port}/healthz?full=1" in body["error"]


def test_an_https_app_probe_does_not_verify_the_apps_certificate_as_the_kubelet_does_not(rig: Rig,
                                                                                         tmp_path: Path) -> None:
    app = App(tmp_path, tls=True)
    try:
        agent = rig.agent(app_probes=probes(livez={"port": app.port, "path": "/live", "scheme": "HTTPS"}))
        assert get(agent, "/app-health/app/livez") == (200, "app says /live")
    finally:
        app.close()


@pytest.mark.parametrize(("text", "message"), [
    ("{", "not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("[]", "must be a JSON object"),
    ('{"/healthz": {"port": 8080}}', "'/healthz' is not a path under /app-health/"),
    ('{"/app-health/app/livez": 8080}', "/app-health/app/livez: must be an object"),
    ('{"/app-health/app/livez": {"port": "http"}}', "/app-health/app/livez: port 'http' is not a number"),
    ('{"/app-health/app/livez": {"port": 8080, "scheme": "TCP"}}', "scheme 'TCP' is neither HTTP nor HTTPS"),
    ('{"/app-health/app/livez": {"port": 8080, "httpHeaders": [{"value": "x"}]}}', "httpHeaders must be a list"),
])
def test_app_probes_that_cannot_be_used_are_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(AppProbesError) as raised:
        parse_app_probes(text)
    assert message in str(raised.value) and "\n" not in str(raised.value)


# ---- a HAProxy left by a killed agent ------------------------------------------------------------------------
ORPHAN = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: open(sys.argv[1] + ".soft-stopped", "w").close())
open(sys.argv[1] + ".up", "w").close()
while True:
    time.sleep(1)
"""


def test_a_haproxy_left_by_a_killed_agent_is_soft_stopped_at_start_and_gone_before_the_new_one_starts(
        rig: Rig) -> None:
    paths = ProxyPaths(str(rig.tmp_path / "run"))
    os.makedirs(paths.run_dir)
    # Stands in for HAProxy's master: its own session, the run directory's configuration on its command line, its
    # pid in the pid file.
    orphan = subprocess.Popen([sys.executable, "-c", ORPHAN, paths.config], start_new_session=True)
    try:
        eventually(lambda: os.path.exists(paths.config + ".up"), "the stand-in to run")
        Path(paths.pid).write_text(f"{orphan.pid}\n")
        rig.agent()
        eventually(lambda: os.path.exists(paths.config + ".soft-stopped"), "the soft stop")
        assert orphan.poll() is None  # still finishing its connections
        rig.issue()
        assert rig.feed.deliver(1, {"n": 1})
        assert orphan.wait(WAIT) == -signal.SIGKILL and rig.proxy.alive
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_pid_file_naming_another_process_is_left_alone(rig: Rig) -> None:
    paths = ProxyPaths(str(rig.tmp_path / "run"))
    os.makedirs(paths.run_dir)
    other = subprocess.Popen([sys.executable, "-c", ORPHAN, str(rig.tmp_path / "elsewhere.cfg")],
                             start_new_session=True)
    try:
        eventually((rig.tmp_path / "elsewhere.cfg.up").exists, "the other process to run")
        Path(paths.pid).write_text(f"{other.pid}\n")
        rig.agent()
        rig.issue()
        assert rig.feed.deliver(1, {"n": 1})
        assert other.poll() is None and not (rig.tmp_path / "elsewhere.cfg.soft-stopped").exists()
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_haproxy_switches_to_its_user_through_setpriv_so_that_nothing_forks_beside_grpc(tmp_path: Path) -> None:
    proxy = _haproxy(ProxyPaths(str(tmp_path)), 2102, 2102)
    assert proxy.prefix[1:] == ["--reuid=2102", "--regid=2102", "--clear-groups"]  # type: ignore[attr-defined]
    assert (proxy.uid, proxy.gid) == (2102, 2102)  # type: ignore[attr-defined]
