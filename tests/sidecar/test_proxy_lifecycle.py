"""The real HAProxy on loopback: which changes go through the runtime API and which reload, that a reload keeps the
listening sockets, and that a stop lets open connections finish."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from catalog.documents import OutboundService
from sidecar.haproxy import ProxyPorts, Server
from sidecar.proxy import Proxy, ProxyConfigInvalid
from tests.sidecar.support import (
    App,
    Proxies,
    TcpEcho,
    bundle,
    document,
    endpoint,
    free_port,
    make_svid,
    outbound_ports,
    rendered,
    request,
    service,
    shard,
    sid,
    split,
)
from tests.support.pki import Authority
from tests.support.wait import eventually as wait_for

pytestmark = pytest.mark.integration

WEB = sid("shop", "web")


def _doc(*services: OutboundService) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    s = shard("shop", *services)
    return document(shards=[s], access="allow", spiffe_id=WEB, me="shop/web-1"), [s]


def _start(proxies: Proxies, root: Authority, certs: Path, *services: OutboundService) -> tuple[Proxy, ProxyPorts]:
    doc, shards = _doc(*services)
    q = services[0].ports[0].port
    ports = outbound_ports(q)
    proxy, _ = proxies.start(doc, shards, make_svid(root, WEB, certs), bundle(root), ports)
    return proxy, ports


def _apply(proxy: Proxy, ports: ProxyPorts, *services: OutboundService) -> str:
    doc, shards = _doc(*services)
    return proxy.apply(rendered(doc, shards, proxy.paths.run_dir, ports))


def test_an_endpoint_change_goes_through_the_runtime_api_and_keeps_the_worker(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p1, p2, q = free_port(), free_port(), free_port()
    a, b = App("a", "127.0.0.1", p1), App("b", "127.0.0.1", p2)
    try:
        proxy, ports = _start(proxies, root, certs, service("api", "127.0.0.1", [("http", q, "http",
                                                                                  [endpoint("127.0.0.1", p1)])]))
        assert request("127.0.0.1", q).body["app"] == "a"
        master, workers = proxy.pid, proxy.worker_pids()

        moved = service("api", "127.0.0.1", [("http", q, "http", [endpoint("127.0.0.1", p2)])])
        assert _apply(proxy, ports, moved) == "runtime"
        assert {request("127.0.0.1", q).body["app"] for _ in range(4)} == {"b"}
        assert (proxy.pid, proxy.worker_pids()) == (master, workers)
        assert f"127.0.0.1:{p2}" in Path(proxy.paths.config).read_text()  # a later reload starts from here
        assert _apply(proxy, ports, moved) == "unchanged"
    finally:
        a.close()
        b.close()


def test_a_split_weight_change_that_keeps_the_sum_is_a_runtime_map_change(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p1, p2, q = free_port(), free_port(), free_port()
    v1, v2 = App("v1", "127.0.0.1", p1), App("v2", "127.0.0.1", p2)

    def api(w1: int, w2: int) -> OutboundService:
        return service("api", "127.0.0.1", [("http", q, "http", [endpoint("127.0.0.1", p1)])],
                       split=split("shop/s", [("api-v1", w1, {q: [endpoint("127.0.0.1", p1)]}),
                                              ("api-v2", w2, {q: [endpoint("127.0.0.1", p2)]})]))
    try:
        proxy, ports = _start(proxies, root, certs, api(10, 0))
        assert {request("127.0.0.1", q).body["app"] for _ in range(5)} == {"v1"}
        workers = proxy.worker_pids()
        assert _apply(proxy, ports, api(0, 10)) == "reload"  # a leg with weight 0 had no backend: structure
        assert {request("127.0.0.1", q).body["app"] for _ in range(5)} == {"v2"}
        assert proxy.worker_pids()[0] != workers[0]
        assert _apply(proxy, ports, api(10, 0)) == "reload"
        assert _apply(proxy, ports, api(9, 1)) == "reload"  # both legs now have backends
        workers = proxy.worker_pids()
        assert _apply(proxy, ports, api(1, 9)) == "runtime"
        assert proxy.worker_pids()[0] == workers[0]
        entries = proxy.runtime.show_map(proxy.paths.file(f"split.shop.api.{q}.map"))
        assert entries == {"0:0": f"http:shop.api:{q}:api-v1", "1:9": f"http:shop.api:{q}:api-v2"}
    finally:
        v1.close()
        v2.close()


def test_a_new_service_reloads_without_refusing_a_single_connection(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p, q, q2 = free_port(), free_port(), free_port()
    app = App("api", "127.0.0.1", p)
    try:
        api = service("api", "127.0.0.1", [("http", q, "http", [endpoint("127.0.0.1", p)])])
        proxy, ports = _start(proxies, root, certs, api)
        master = proxy.pid
        failures: list[str] = []
        done = threading.Event()
        count = 0

        def hammer() -> None:  # a new connection per request, for as long as the reloads last (bounded)
            nonlocal count
            deadline = time.monotonic() + 30
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    if request("127.0.0.1", q, timeout=5).status != 200:
                        failures.append("status")
                except OSError as exc:
                    failures.append(repr(exc))
                count += 1

        client = threading.Thread(target=hammer, daemon=True)
        client.start()
        try:
            wait_for(lambda: count > 20, what="client running")
            results = []
            for i in range(3):
                extra = service(f"extra{i}", "127.0.0.1", [("http", q2, "http", [endpoint("127.0.0.1", p)])])
                results.append(_apply(proxy, ports, api, extra))
                served_before = count
                wait_for(lambda: count > served_before + 20, what="client served after the reload")  # noqa: B023
        finally:
            done.set()
            client.join(timeout=30)
        assert results == ["reload"] * 3
        assert failures == []
        assert proxy.pid == master
        assert f"http:shop.extra2:{q2}" in {row["pxname"] for row in proxy.stats()}  # the new worker has it
    finally:
        app.close()


def test_a_refused_configuration_leaves_the_running_one_in_place(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p, q = free_port(), free_port()
    app = App("api", "127.0.0.1", p)
    try:
        api = service("api", "127.0.0.1", [("http", q, "http", [endpoint("127.0.0.1", p)])])
        proxy, ports = _start(proxies, root, certs, api)
        running = proxy.config
        assert running is not None
        broken = dataclasses.replace(running, text=running.text + "\nbackend broken\n    nonsense here\n",
                                     structure="sha256:other")
        with pytest.raises(ProxyConfigInvalid, match="nonsense"):
            proxy.apply(broken)
        assert proxy.config is running
        assert Path(proxy.paths.config).read_text() == running.text
        assert request("127.0.0.1", q).status == 200
    finally:
        app.close()


def test_a_runtime_command_that_fails_falls_back_to_a_reload(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p1, p2, q = free_port(), free_port(), free_port()
    a, b = App("a", "127.0.0.1", p1), App("b", "127.0.0.1", p2)
    try:
        proxy, ports = _start(proxies, root, certs, service("api", "127.0.0.1", [("http", q, "http",
                                                                                  [endpoint("127.0.0.1", p1)])]))
        doc, shards = _doc(service("api", "127.0.0.1", [("http", q, "http", [endpoint("127.0.0.1", p2)])]))
        new = rendered(doc, shards, proxy.paths.run_dir, ports)
        running = proxy.config
        assert running is not None
        # a slot HAProxy does not have, in both, so the structures stay equal and the command runs (and fails)
        ghost = {f"http:shop.api:{q}/ghost": Server("127.0.0.1", 1, False)}
        proxy._config = dataclasses.replace(running, servers={**running.servers, **ghost})
        new = dataclasses.replace(new, servers={**new.servers, f"http:shop.api:{q}/ghost": Server("127.0.0.1", 2,
                                                                                                   True)})
        assert proxy.apply(new) == "reload"
        assert request("127.0.0.1", q).body["app"] == "b"
    finally:
        a.close()
        b.close()


def test_stop_lets_an_open_connection_finish_while_refusing_new_ones(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p, q = free_port(), free_port()
    echo = TcpEcho("127.0.0.1", p)
    try:
        proxy, _ = _start(proxies, root, certs, service("db", "127.0.0.1", [("tcp", q, "tcp",
                                                                             [endpoint("127.0.0.1", p)])]))
        held = socket.create_connection(("127.0.0.1", q), timeout=10)
        held.sendall(b"one")
        assert held.recv(10) == b"one"
        stopper = threading.Thread(target=proxy.stop, kwargs={"drain_seconds": 30}, daemon=True)
        stopper.start()
        wait_for(lambda: _refused(q), what="new connections refused")
        held.sendall(b"two")
        assert held.recv(10) == b"two"  # still served while draining
        assert proxy.running
        held.close()
        stopper.join(timeout=30)
        assert not stopper.is_alive() and not proxy.running
    finally:
        echo.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except (ConnectionRefusedError, ConnectionResetError):  # a reset: the handshake raced the listener's close
        return True
    return False
