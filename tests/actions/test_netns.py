"""Pods as network namespaces (actions.netns): real namespaces, veths and a bridge, made by the `host_network`
fixture with a per-run prefix and subnet, and checked with `ip` and real TCP connections."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actions.errors import MissingTool
from actions.netns import IFNAMSIZ, HostNetwork, NetnsError, PodNet, pod_command, run, spawn, veth_name
from tests.support.netns import connect, make_host_network, start_listener

# -- pure: names, validation -------------------------------------------------------------------------------------


def test_a_long_pod_name_gets_a_short_stable_and_distinct_interface_name() -> None:
    long_a = "checkout-service-with-a-very-long-deployment-name-7d9f8b6c5-abcde"
    long_b = long_a[:-1] + "f"
    assert len(veth_name("abcdef-", long_a)) == IFNAMSIZ
    assert veth_name("abcdef-", long_a) == veth_name("abcdef-", long_a)
    assert veth_name("abcdef-", long_a) != veth_name("abcdef-", long_b)


@pytest.mark.parametrize("prefix", ["", "ml", "ML-", "1ml-", "toolong-", "m-l-", "ml_"])
def test_a_prefix_that_could_be_confused_with_another_is_refused(prefix: str) -> None:
    with pytest.raises(NetnsError, match="prefix"):
        HostNetwork(prefix, ipaddress.IPv4Network("10.200.0.0/24"))


def test_a_subnet_without_room_for_a_pod_is_refused() -> None:
    with pytest.raises(NetnsError, match="too small"):
        HostNetwork("ml-", ipaddress.IPv4Network("10.200.0.0/31"))


def test_the_gateway_is_the_first_address_and_the_bridge_is_named_after_the_prefix() -> None:
    net = HostNetwork("ml-", ipaddress.IPv4Network("10.200.0.0/24"))
    assert (net.bridge, str(net.gateway)) == ("ml-br", "10.200.0.1")


def test_a_command_for_an_unprivileged_uid_enters_the_namespace_before_dropping_privileges() -> None:
    pod = PodNet("web", "ml-web", ipaddress.IPv4Address("10.200.0.2"), ipaddress.IPv4Address("10.200.0.1"), 24,
                 "ml-0000aaaa")
    ip, setpriv = shutil.which("ip"), shutil.which("setpriv")
    assert pod_command(pod, ["true"]) == [ip, "netns", "exec", "ml-web", "true"]
    assert pod_command(pod, ["true"], uid=2102) == [ip, "netns", "exec", "ml-web", setpriv, "--reuid", "2102",
                                                    "--regid", "2102", "--clear-groups", "--", "true"]
    with pytest.raises(NetnsError, match="empty command"):
        pod_command(pod, [])


def test_a_missing_ip_command_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingTool, match="'ip' command .* not installed"):
        HostNetwork("ml-", ipaddress.IPv4Network("10.200.0.0/24")).ensure()


# -- real namespaces ---------------------------------------------------------------------------------------------


def _links() -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [link["ifname"] for link in json.loads(out)]


def _wait_until_inside(pod: PodNet, proc: subprocess.Popen[bytes]) -> None:
    """`spawn` returns once forked: poll (bounded) until the process has entered the pod's namespace."""
    deadline = time.monotonic() + 10
    while str(proc.pid) not in run_ip("netns", "pids", pod.netns).split():
        assert time.monotonic() < deadline, f"process {proc.pid} never entered {pod.netns}"
        time.sleep(0.01)


def run_ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _netns() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.integration
def test_two_pods_reach_each_other_over_the_bridge(host_network: HostNetwork) -> None:
    a = host_network.add_pod("a")
    b = host_network.add_pod("b")
    assert (a.ip, b.ip) == (host_network.gateway + 1, host_network.gateway + 2)
    listener = start_listener(a, 8080, host=str(a.ip))
    try:
        answer = connect(b, a.ip, 8080, uid=65534)
    finally:
        listener.kill()
        listener.communicate(timeout=10)
    assert answer.split()[0] == f"{a.ip}:8080"


@pytest.mark.integration
def test_a_pod_reaches_the_hosts_bridge_address(host_network: HostNetwork) -> None:
    pod = host_network.add_pod("a")
    # The host side of the bridge, from inside the pod: ARP resolves and the route via the gateway is there.
    out = run(pod, ["ip", "-4", "route", "get", str(host_network.gateway)]).stdout
    assert "dev eth0" in out
    server = subprocess.Popen([sys.executable, "-c", (
        "import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); s.listen(); print(s.getsockname()[1], "
        "flush=True); s.settimeout(30); c,_=s.accept(); c.sendall(b'host\\n'); c.close()"), str(host_network.gateway)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        assert connect(pod, host_network.gateway, port) == "host"
    finally:
        server.kill()
        server.communicate(timeout=10)


@pytest.mark.integration
def test_a_process_spawned_with_a_uid_runs_as_that_uid_inside_the_pod(host_network: HostNetwork) -> None:
    pod = host_network.add_pod("web")
    probe = "import os; print(os.getuid(), os.getgid(), os.getgroups())"
    assert run(pod, [sys.executable, "-c", probe], uid=2102).stdout.split() == ["2102", "2102", "[]"]
    assert run(pod, [sys.executable, "-c", probe], uid=65534, gid=65533).stdout.split() == ["65534", "65533", "[]"]
    # ... and it sees the pod's network, not the host's.
    addresses = run(pod, ["ip", "-4", "-o", "addr", "show"], uid=65534).stdout
    assert f"eth0    inet {pod.interface}" in addresses
    assert f"{host_network.gateway}/" not in addresses


@pytest.mark.integration
def test_spawn_returns_the_workloads_own_process(host_network: HostNetwork) -> None:
    pod = host_network.add_pod("web")
    proc = spawn(pod, [sys.executable, "-c", "import os,sys; print(os.getpid()); sys.stdout.flush(); input()"],
                 uid=65534, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert int(proc.stdout.readline()) == proc.pid
    finally:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.integration
def test_names_in_the_pods_hosts_file_resolve_inside_the_pod(host_network: HostNetwork) -> None:
    a = host_network.add_pod("a")
    b = host_network.add_pod("b")
    path = host_network.hosts_file(a, {"backend.default.svc": str(b.ip), "backend": b.ip})
    assert path == Path("/etc/netns") / a.netns / "hosts"
    resolve = "import socket,sys; print(' '.join(socket.gethostbyname(n) for n in sys.argv[1:]))"
    out = run(a, [sys.executable, "-c", resolve, "backend.default.svc", "backend", "a", "localhost"], uid=65534)
    assert out.stdout.split() == [str(b.ip), str(b.ip), str(a.ip), "127.0.0.1"]
    with pytest.raises(NetnsError, match="not an IP address"):
        host_network.hosts_file(a, {"x": "nowhere"})


@pytest.mark.integration
def test_addresses_are_allocated_in_order_and_a_taken_or_foreign_address_is_refused(
        host_network: HostNetwork) -> None:
    gw = host_network.gateway
    fixed = host_network.add_pod("fixed", gw + 5)
    assert fixed.ip == gw + 5
    assert [host_network.add_pod(n).ip for n in ("p1", "p2")] == [gw + 1, gw + 2]
    with pytest.raises(NetnsError, match="already used"):
        host_network.add_pod("p3", gw + 5)
    with pytest.raises(NetnsError, match="already used"):
        host_network.add_pod("p3", gw)
    with pytest.raises(NetnsError, match="not a host address"):
        host_network.add_pod("p3", "192.0.2.1")
    with pytest.raises(NetnsError, match="already exists"):
        host_network.add_pod("p1")
    assert [p.name for p in host_network.pods()] == ["fixed", "p1", "p2"]
    assert not any(n == host_network.netns_name("p3") for n in _netns())  # refusals left nothing behind


@pytest.mark.integration
def test_long_pod_names_work_and_stay_distinct(host_network: HostNetwork) -> None:
    first = host_network.add_pod("payments-api-with-a-rather-long-deployment-name-5f7c9d-x8k2p")
    second = host_network.add_pod("payments-api-with-a-rather-long-deployment-name-5f7c9d-x8k2q")
    assert first.host_veth != second.host_veth
    assert {first.host_veth, second.host_veth} <= set(_links())
    listener = start_listener(first, 9000)
    try:
        assert connect(second, first.ip, 9000).startswith(f"{first.ip}:9000")
    finally:
        listener.kill()
        listener.communicate(timeout=10)


@pytest.mark.integration
def test_ensure_is_idempotent_and_a_new_owner_adopts_the_existing_pods(host_network: HostNetwork) -> None:
    a = host_network.add_pod("a")
    host_network.ensure()
    again = HostNetwork(host_network.prefix, host_network.subnet).ensure()
    assert again.pods() == [a] == host_network.pods()
    assert again.add_pod("b").ip == a.ip + 1


@pytest.mark.integration
def test_remove_pod_kills_its_processes_and_leaves_no_namespace_or_veth(host_network: HostNetwork) -> None:
    pod = host_network.add_pod("web")
    host_network.hosts_file(pod, {})
    sleeper = spawn(pod, ["sleep", "600"], uid=65534)
    _wait_until_inside(pod, sleeper)
    host_network.remove_pod("web")
    assert sleeper.wait(timeout=10) == -9
    assert pod.netns not in _netns() and pod.host_veth not in _links()
    assert not (Path("/etc/netns") / pod.netns).exists()
    host_network.remove_pod("web")  # idempotent


@pytest.mark.integration
def test_destroy_after_a_crash_leaves_nothing_with_the_prefix(host_network: HostNetwork) -> None:
    pods = [host_network.add_pod(n) for n in ("a", "b", "c")]
    host_network.hosts_file(pods[0], {"b": str(pods[1].ip)})
    sleeper = spawn(pods[1], ["sleep", "600"])
    _wait_until_inside(pods[1], sleeper)
    # A crashed owner: a new object that never saw these pods (and never ran ensure) sweeps them by prefix.
    HostNetwork(host_network.prefix, host_network.subnet).destroy()
    assert sleeper.wait(timeout=10) == -9
    assert [n for n in _links() if n.startswith(host_network.prefix)] == []
    assert [n for n in _netns() if n.startswith(host_network.prefix)] == []
    assert not [p for p in Path("/etc/netns").glob(f"{host_network.prefix}*")]
    host_network.destroy()  # idempotent


@pytest.mark.integration
def test_a_subnet_already_on_another_interface_is_refused(host_network: HostNetwork) -> None:
    clash = HostNetwork("ml" + host_network.prefix[2:], host_network.subnet)
    assert clash.prefix != host_network.prefix
    try:
        with pytest.raises(NetnsError, match=f"overlaps .* on interface {host_network.bridge}"):
            clash.ensure()
    finally:
        clash.destroy()


@pytest.mark.integration
def test_a_failing_test_still_leaves_nothing_behind() -> None:
    with pytest.raises(RuntimeError), make_host_network() as net:
        pod = net.add_pod("a")
        spawn(pod, ["sleep", "600"])
        raise RuntimeError("the test failed")
    assert [n for n in _links() if n.startswith(net.prefix)] == []
    assert [n for n in _netns() if n.startswith(net.prefix)] == []
