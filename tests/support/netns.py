"""The `host_network` fixture: pods as network namespaces on this host, with a per-run prefix and subnet.

Each use gets its own `HostNetwork` (actions.netns): a prefix "mt<4 hex>-" not in use on the host, and a /24 inside
10.128.0.0/9 that no interface on the host has an address in. Tests may assign addresses of that subnet to pods and
send traffic to them, nothing else. Everything is destroyed afterwards, also when the test fails; `destroy` finds
what is left by prefix, so even processes still running in a pod are killed.

A run killed before its cleanup is swept by the next run (see OWNERS).

Skipped (with the reason) when not root or when `ip netns` does not work here; in CI (CI=true), a root that cannot
make namespaces fails instead, since CI must run these tests.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from actions.errors import HostUnsupported
from actions.netns import HostNetwork, NetnsError, PodNet, run, spawn

_POOL = ipaddress.IPv4Network("10.128.0.0/9")


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host already has an address or a route in (all tables)."""
    taken: list[ipaddress.IPv4Network] = []
    addrs = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=30, check=True)
    for link in json.loads(addrs.stdout or "[]"):
        for info in link.get("addr_info", []):
            taken.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    routes = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                            timeout=30, check=True)
    for route in json.loads(routes.stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            taken.append(ipaddress.IPv4Network(dst, strict=False))
    return taken


def _prefixes_in_use() -> set[str]:
    names = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=30, check=True)
    links = [link["ifname"] for link in json.loads(names.stdout or "[]")]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30,
                           check=True).stdout.split()
    return {name.split("-", 1)[0] + "-" for name in [*links, *netns] if "-" in name}


def pick_prefix_and_subnet() -> tuple[str, ipaddress.IPv4Network]:
    in_use = _prefixes_in_use()
    prefix = next(p for p in (f"mt{secrets.token_hex(2)}-" for _ in range(100)) if p not in in_use)
    taken = _host_networks()
    for _ in range(1000):
        candidate = ipaddress.IPv4Network((int(_POOL.network_address) + secrets.randbelow(2**15) * 256, 24))
        if not any(candidate.overlaps(t) for t in taken):
            return prefix, candidate
    raise RuntimeError("no free /24 in 10.128.0.0/9 on this host")


# Each run's prefix is recorded with its pid, so a run killed before its cleanup (SIGKILL, a lost CI runner) is
# swept by the next one: a record whose process is gone names leftovers nobody owns.
OWNERS = Path("/run/meshloom-test-netns")


def sweep_abandoned() -> list[str]:
    """Destroy the networks of test runs that died without cleaning up; returns their prefixes."""
    swept = []
    for record in sorted(OWNERS.glob("*.pid")) if OWNERS.is_dir() else []:
        try:
            os.kill(int(record.read_text().strip()), 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        prefix = record.stem
        HostNetwork(prefix, _POOL).destroy()  # destroy finds everything by prefix; the subnet is not used
        record.unlink(missing_ok=True)
        swept.append(prefix)
    return swept


@contextmanager
def make_host_network() -> Iterator[HostNetwork]:
    """A fresh HostNetwork, destroyed on exit (for fixtures of other scopes; skips or fails as the fixture does)."""
    if os.geteuid() != 0:
        pytest.skip(f"network namespaces need root (tests run as uid {os.geteuid()})")
    try:
        sweep_abandoned()
        prefix, subnet = pick_prefix_and_subnet()
        net = HostNetwork(prefix, subnet)
        OWNERS.mkdir(mode=0o755, exist_ok=True)
        record = OWNERS / f"{prefix}.pid"
        record.write_text(f"{os.getpid()}\n")
        try:
            net.ensure()
            net.remove_pod(net.add_pod("probe").name)  # `ip netns add` itself works here
        except BaseException:
            with suppress(Exception):
                net.destroy()  # a half-made bridge
            record.unlink(missing_ok=True)
            raise
    except (HostUnsupported, NetnsError, OSError, subprocess.SubprocessError, ValueError) as exc:
        reason = f"network namespaces do not work here: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true and running as root: these tests must run)", pytrace=False)
        pytest.skip(reason)
    try:
        yield net
    finally:
        net.destroy()
        record.unlink(missing_ok=True)


@pytest.fixture
def host_network() -> Iterator[HostNetwork]:
    """A HostNetwork with a unique prefix and subnet for this test, destroyed afterwards (even on failure)."""
    with make_host_network() as net:
        yield net


# -- a TCP listener and a client to run inside pods ----------------------------------------------------------------

# Accepts connections until killed or idle for 60 s; answers each with one line "<local ip:port> <original dst
# ip:port>" and closes. The original destination comes from SO_ORIGINAL_DST (getsockopt(SOL_IP, 80)), which is
# what a proxy behind an iptables REDIRECT reads; "-" when the connection has no NAT record, and always on IPv6
# (listening on an IPv6 `host` such as "::", IPv6 only: the rules under test redirect nothing there).
LISTENER_SOURCE = r"""
import socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
server = socket.socket(family)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == socket.AF_INET6:
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
server.bind((host, port))
server.listen(64)
server.settimeout(60)
print("ready", flush=True)
while True:
    try:
        conn, _ = server.accept()
    except TimeoutError:
        break
    with conn:
        local = "%s:%d" % conn.getsockname()[:2]
        original = "-"
        if family == socket.AF_INET:
            try:
                raw = conn.getsockopt(socket.SOL_IP, 80, 16)
                original = "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
            except OSError:
                pass
        conn.sendall(("%s %s\n" % (local, original)).encode())
"""

# Connects to argv[1]:argv[2] with a 5 s timeout and prints the listener's line (or "refused"/"timeout").
CLIENT_SOURCE = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        print(s.makefile().readline().strip())
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""


def start_listener(pod: PodNet, port: int, *, host: str = "0.0.0.0", uid: int | None = None,
                   ready_within: float = 10.0) -> subprocess.Popen[str]:
    """Start LISTENER_SOURCE in the pod and return once it listens. The caller terminates it (a `try/finally` or
    the pod's removal, which kills whatever runs in it)."""
    proc = spawn(pod, [sys.executable, "-c", LISTENER_SOURCE, host, str(port)], uid=uid, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], ready_within)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"listener in {pod.name} on {host}:{port} did not start: {line!r} {err.strip()}")
    return proc


def connect(pod: PodNet, host: str | ipaddress.IPv4Address, port: int, *, uid: int | None = None) -> str:
    """Connect from inside the pod (as `uid`) and return what the listener said: "<local> <original dst>"."""
    return run(pod, [sys.executable, "-c", CLIENT_SOURCE, str(host), str(port)], uid=uid).stdout.strip()
