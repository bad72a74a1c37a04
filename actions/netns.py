"""Pods as network namespaces on one host: a bridge, one netns and one veth pair per pod, processes run inside.

Theory of operation
-------------------
A `HostNetwork` owns everything whose name starts with its `prefix` (1 to 6 lower-case letters or digits, starting
with a letter, then "-", e.g. "ml-"):

    <prefix>br           the bridge; its address is the subnet's first host address, the pods' gateway
    <prefix><pod>        one network namespace per pod (/run/netns/<prefix><pod>)
    <prefix><8 hex>      the host end of the pod's veth pair, on the bridge; the hex is sha256(pod name)[:8], so any
                         pod name fits Linux's 15-character limit on interface names and the name is stable
    eth0                 the pod end, created directly inside the namespace (no temporary name to collide on)
    /etc/netns/<netns>/  files `ip netns exec` bind-mounts over /etc inside the namespace (`hosts_file`)

Because a prefix contains exactly one "-" (its last character), "everything with this prefix" is exact: no other
prefix is a prefix of it, so `destroy` can sweep what a crashed run left behind by name alone, without any record.

Pods talk to each other through the bridge (layer 2) and to the host's bridge address; nothing is routed or NATed
to the outside world, so `ip_forward` is left as it is (bridged traffic does not need it). Hosts with
br_netfilter and a FORWARD policy of DROP (Docker sets one) do filter bridged frames; that is the host's choice and
is not changed here.

The kernel is the truth: `ensure()` adopts the pods that already exist under the prefix (their addresses read
back from each namespace), so a restarted owner carries on. One `HostNetwork` object per prefix at a time: the
allocation of free addresses is guarded by a lock inside the object, not across processes.

Processes run inside a pod with `spawn` / `run`: `ip netns exec <netns>` (which also bind-mounts the pod's
/etc/netns files) and, for an unprivileged uid, `setpriv --reuid --regid --clear-groups` after entering, so the
workload holds no capability. `ip netns exec` execs in place: the returned Popen's pid is the workload's.

Errors: a missing `ip` (or `setpriv`) raises `MissingTool`, a missing privilege `MissingPrivilege` (both one line,
from actions.errors); anything else `ip` refuses raises `NetnsError` with the command and ip's own message.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from actions.errors import MissingPrivilege, MissingTool, PermanentError

NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
POD_INTERFACE = "eth0"
IFNAMSIZ = 15  # Linux's limit on an interface name, without the terminating NUL
_HASH_CHARS = 8  # 32 bits: a collision between two pods of one network is refused, not silently merged
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,5}-")
_POD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_KILL_ROUNDS = 100  # listings of a pod's processes before giving up on one that will not die (about 1 s and more)
_COMMAND_TIMEOUT = 30.0  # an `ip` call that hangs this long is broken, not slow

# Capability bits (linux/capability.h), read from /proc/self/status for a non-root caller.
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21


class NetnsError(PermanentError):
    """`ip` refused an operation on the pods' network, or a request was malformed (one line)."""


@dataclass(frozen=True, slots=True)
class PodNet:
    """A pod's network: its namespace, its address on the bridge, and its veth pair."""

    name: str
    netns: str
    ip: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    prefixlen: int
    host_veth: str
    pod_veth: str = POD_INTERFACE

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.ip}/{self.prefixlen}")

    @property
    def netns_path(self) -> Path:
        """For `nsenter --net=...` or `setns(2)`."""
        return NETNS_RUN_DIR / self.netns


def check_host(*, need_sys_admin: bool = True) -> None:
    """Raise MissingTool / MissingPrivilege (one line) unless `ip` exists and we may manage network namespaces.

    Adding a namespace mounts it (CAP_SYS_ADMIN); links, addresses and routes need CAP_NET_ADMIN."""
    if shutil.which("ip") is None:
        raise MissingTool("the 'ip' command (iproute2) is not installed: apt-get install iproute2")
    if os.geteuid() == 0:
        return
    effective = _effective_capabilities()
    missing = [name for name, bit in (("CAP_NET_ADMIN", _CAP_NET_ADMIN), ("CAP_SYS_ADMIN", _CAP_SYS_ADMIN))
               if (name == "CAP_NET_ADMIN" or need_sys_admin) and not effective >> bit & 1]
    if missing:
        raise MissingPrivilege(f"managing network namespaces needs root or {' and '.join(missing)} "
                               f"(running as uid {os.geteuid()})")


def _effective_capabilities() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def veth_name(prefix: str, pod: str) -> str:
    """The host end of a pod's veth pair: the prefix and a hash of the pod's name, at most 15 characters."""
    return prefix + hashlib.sha256(pod.encode()).hexdigest()[:_HASH_CHARS]


class HostNetwork:
    """One bridge and the pods on it. See the module's docstring for names and guarantees."""

    def __init__(self, prefix: str, subnet: ipaddress.IPv4Network | str) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise NetnsError(f"prefix {prefix!r}: 1 to 6 lower-case letters or digits starting with a letter, "
                             f"then '-' (e.g. 'ml-')")
        net = ipaddress.IPv4Network(subnet)
        if net.num_addresses < 4:
            raise NetnsError(f"subnet {net}: too small for a gateway and a pod (at most /30)")
        self.prefix = prefix
        self.subnet = net
        self.bridge = f"{prefix}br"
        self.gateway = next(net.hosts())
        self._pods: dict[str, PodNet] = {}
        self._lock = threading.Lock()
        self._veth = re.compile(re.escape(prefix) + f"[0-9a-f]{{{_HASH_CHARS}}}")

    def __repr__(self) -> str:
        return f"HostNetwork(prefix={self.prefix!r}, subnet={str(self.subnet)!r})"

    # -- the bridge ----------------------------------------------------------------------------------------------

    def ensure(self) -> HostNetwork:
        """Create the bridge with the gateway address (idempotent) and adopt the pods already under the prefix."""
        check_host()
        with self._lock:
            self._refuse_overlap()
            if not _link_exists(self.bridge):
                _ip("link", "add", self.bridge, "type", "bridge")
            gateway = f"{self.gateway}/{self.subnet.prefixlen}"
            if gateway not in _addresses(self.bridge):
                _ip("addr", "replace", gateway, "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            self._pods = {pod.name: pod for pod in self._read_pods()}
        return self

    def _refuse_overlap(self) -> None:
        """Another interface with an address in our subnet would make the host's replies to pods go astray."""
        out = _ip("-j", "-4", "addr", "show").stdout
        for link in json.loads(out or "[]"):
            if link.get("ifname") == self.bridge:
                continue
            for info in link.get("addr_info", []):
                other = ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
                if other.overlaps(self.subnet):
                    raise NetnsError(f"subnet {self.subnet} overlaps {other} on interface {link['ifname']}: "
                                     f"choose another subnet")

    # -- pods ----------------------------------------------------------------------------------------------------

    def netns_name(self, pod: str) -> str:
        return self.prefix + pod

    def add_pod(self, name: str, ip: ipaddress.IPv4Address | str | None = None) -> PodNet:
        """A new namespace with eth0 on the bridge at `ip` (the next free address when None), lo up, and a default
        route via the gateway. Refused if the pod exists or the address is taken or outside the subnet."""
        if not _POD_NAME.fullmatch(name):
            raise NetnsError(f"pod name {name!r}: letters, digits, '.', '_' and '-', starting with a letter or a "
                             f"digit, at most 200 characters")
        with self._lock:
            if name in self._pods:
                raise NetnsError(f"pod {name!r} already exists in {self.prefix}")
            address = self._allocate(ip)
            pod = PodNet(name=name, netns=self.netns_name(name), ip=address, gateway=self.gateway,
                         prefixlen=self.subnet.prefixlen, host_veth=veth_name(self.prefix, name))
            clash = next((p.name for p in self._pods.values() if p.host_veth == pod.host_veth), None)
            if clash is not None:
                raise NetnsError(f"pod {name!r}: its interface name {pod.host_veth} collides with pod {clash!r}'s; "
                                 f"rename one of them")
            try:
                _ip("netns", "add", pod.netns)
                _ip_batch(None, [
                    f"link add {pod.host_veth} type veth peer name {POD_INTERFACE} netns {pod.netns}",
                    f"link set {pod.host_veth} master {self.bridge} up",
                ])
                _ip_batch(pod.netns, [
                    f"addr add {pod.interface} dev {POD_INTERFACE}",
                    f"link set {POD_INTERFACE} up",
                    "link set lo up",
                    f"route add default via {self.gateway}",
                ])
            except BaseException:
                self._teardown(pod.netns, pod.host_veth)
                raise
            self._pods[name] = pod
            return pod

    def _allocate(self, wanted: ipaddress.IPv4Address | str | None) -> ipaddress.IPv4Address:
        used = {p.ip for p in self._pods.values()} | {self.gateway}
        if wanted is None:
            for candidate in self.subnet.hosts():
                if candidate not in used:
                    return candidate
            raise NetnsError(f"subnet {self.subnet} of {self.prefix} has no free address left")
        address = ipaddress.IPv4Address(wanted)
        if address not in self.subnet or address in (self.subnet.network_address, self.subnet.broadcast_address):
            raise NetnsError(f"address {address} is not a host address of subnet {self.subnet}")
        if address in used:
            raise NetnsError(f"address {address} is already used in {self.subnet}")
        return address

    def remove_pod(self, name: str) -> None:
        """Kill whatever still runs in the pod, delete its veth pair, namespace and /etc/netns files. Idempotent."""
        with self._lock:
            self._pods.pop(name, None)
            self._teardown(self.netns_name(name), veth_name(self.prefix, name))

    def pod(self, name: str) -> PodNet:
        try:
            return self._pods[name]
        except KeyError:
            raise NetnsError(f"no pod {name!r} in {self.prefix}") from None

    def pods(self) -> list[PodNet]:
        """The pods, by name."""
        with self._lock:
            return sorted(self._pods.values(), key=lambda p: p.name)

    def hosts_file(self, pod: PodNet | str, entries: Mapping[str, str | ipaddress.IPv4Address]) -> Path:
        """Write /etc/netns/<netns>/hosts: localhost, the pod's own name, then `entries` (name -> address), so that
        names resolve inside the pod for processes started with `spawn` / `run`. Replaces the file atomically."""
        target = self.pod(pod) if isinstance(pod, str) else pod
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{target.ip}\t{target.name}"]
        for host, address in entries.items():
            if not _HOST_NAME.fullmatch(host):
                raise NetnsError(f"hosts entry {host!r}: not a host name")
            try:
                ip = ipaddress.ip_address(str(address))
            except ValueError:
                raise NetnsError(f"hosts entry {host!r}: {address!r} is not an IP address") from None
            lines.append(f"{ip}\t{host}")
        directory = NETNS_ETC_DIR / target.netns
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        path = directory / "hosts"
        temporary = directory / ".hosts.tmp"
        temporary.write_text("\n".join(lines) + "\n")
        temporary.chmod(0o644)  # read by the pod's unprivileged processes
        temporary.replace(path)
        return path

    # -- teardown ------------------------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Remove every pod, the bridge and the /etc/netns files under the prefix, including what a crashed run
        left behind (found by name). Idempotent; safe to call on a network that was never `ensure`d."""
        check_host()
        with self._lock:
            self._pods.clear()
            for netns in self._leftover_netns():
                self._teardown(netns, None)
            for link in _link_names():
                if link == self.bridge or self._veth.fullmatch(link):
                    _ip("link", "del", link, check=False)
            if NETNS_ETC_DIR.is_dir():
                for entry in NETNS_ETC_DIR.iterdir():
                    if entry.name.startswith(self.prefix):
                        shutil.rmtree(entry, ignore_errors=True)

    def _leftover_netns(self) -> list[str]:
        names = {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}
        if NETNS_RUN_DIR.is_dir():  # a file whose mount was lost is not listed by every ip version
            names |= {p.name for p in NETNS_RUN_DIR.iterdir()}
        return sorted(n for n in names if n.startswith(self.prefix))

    def _teardown(self, netns: str, host_veth: str | None) -> None:
        """Best effort and idempotent: each step ignores 'does not exist'."""
        if (NETNS_RUN_DIR / netns).exists():
            # Processes inside keep the namespace alive after `ip netns del`, unreachable by name: kill them first,
            # and list again until none is left, since one may be entering (a `spawn` racing this removal).
            for _ in range(_KILL_ROUNDS):
                pids = _ip("netns", "pids", netns, check=False).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                time.sleep(0.01)  # SIGKILL is delivered asynchronously; a dying process is still listed
            _ip("-n", netns, "link", "del", POD_INTERFACE, check=False)  # takes the host end with it
            _ip("netns", "del", netns, check=False)
        if host_veth is not None and _link_exists(host_veth):
            _ip("link", "del", host_veth, check=False)
        shutil.rmtree(NETNS_ETC_DIR / netns, ignore_errors=True)

    def _read_pods(self) -> list[PodNet]:
        pods = []
        for netns in self._leftover_netns():
            name = netns[len(self.prefix):]
            if not _POD_NAME.fullmatch(name):
                continue
            result = _ip("-n", netns, "-j", "-4", "addr", "show", "dev", POD_INTERFACE, check=False)
            if result.returncode != 0:
                continue  # a namespace without our eth0: left half-made by a crash; destroy() sweeps it
            for link in json.loads(result.stdout or "[]"):
                for info in link.get("addr_info", []):
                    address = ipaddress.IPv4Address(info["local"])
                    if address in self.subnet:
                        pods.append(PodNet(name=name, netns=netns, ip=address, gateway=self.gateway,
                                           prefixlen=self.subnet.prefixlen, host_veth=veth_name(self.prefix, name)))
        return pods


# -- processes in a pod ------------------------------------------------------------------------------------------


def pod_command(pod: PodNet, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None) -> list[str]:
    """The command line that runs `argv` inside the pod, as `uid`/`gid` when given (gid defaults to uid)."""
    if not argv:
        raise NetnsError("an empty command cannot run in a pod")
    # Absolute paths: a caller's `env` without PATH must not change which ip or setpriv runs.
    ip = shutil.which("ip")
    if ip is None:
        raise MissingTool("the 'ip' command (iproute2) is not installed: apt-get install iproute2")
    prefix = [ip, "netns", "exec", pod.netns]
    if uid is None and gid is None:
        return [*prefix, *argv]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise MissingTool("the 'setpriv' command (util-linux) is not installed")
    user = uid if uid is not None else os.geteuid()
    group = gid if gid is not None else user
    return [*prefix, setpriv, "--reuid", str(user), "--regid", str(group), "--clear-groups", "--", *argv]


def spawn(pod: PodNet, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None,
          env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
          stdin: int | IO[Any] | None = subprocess.DEVNULL, stdout: int | IO[Any] | None = None,
          stderr: int | IO[Any] | None = None, text: bool = False,
          start_new_session: bool = False) -> subprocess.Popen[Any]:
    """Start `argv` inside the pod's namespace (as `uid`/`gid` without capabilities when given). The Popen's pid is
    the workload's own (`ip netns exec` and `setpriv` exec in place). The caller waits for or kills it; removing
    the pod kills whatever is left."""
    command = pod_command(pod, argv, uid=uid, gid=gid)
    try:
        return subprocess.Popen(command, env=dict(env) if env is not None else None, cwd=cwd, stdin=stdin,
                                stdout=stdout, stderr=stderr, text=text, start_new_session=start_new_session)
    except FileNotFoundError:
        raise MissingTool("the 'ip' command (iproute2) is not installed: apt-get install iproute2") from None


def run(pod: PodNet, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None,
        env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None, input: str | None = None,
        timeout: float = _COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command inside the pod and capture its output (text). With `check`, a non-zero exit raises
    NetnsError with the command and the last line of its stderr; a timeout kills it and raises too."""
    command = pod_command(pod, argv, uid=uid, gid=gid)
    try:
        result = subprocess.run(command, env=dict(env) if env is not None else None, cwd=cwd, input=input,
                                capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise MissingTool("the 'ip' command (iproute2) is not installed: apt-get install iproute2") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"in pod {pod.name}: {' '.join(argv)} did not finish within {timeout:g}s") from None
    if check and result.returncode != 0:
        raise NetnsError(f"in pod {pod.name}: {' '.join(argv)} exited with {result.returncode}: "
                         f"{_last_line(result.stderr)}")
    return result


# -- ip(8) -------------------------------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(["ip", *args], input=input, capture_output=True, text=True,
                                timeout=_COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        raise MissingTool("the 'ip' command (iproute2) is not installed: apt-get install iproute2") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"ip {' '.join(args)}: no answer within {_COMMAND_TIMEOUT:g}s") from None
    if check and result.returncode != 0:
        message = _last_line(result.stderr)
        if "Operation not permitted" in result.stderr or "Permission denied" in result.stderr:
            raise MissingPrivilege(f"ip {' '.join(args)}: {message} (needs root or CAP_NET_ADMIN and "
                                   f"CAP_SYS_ADMIN)")
        raise NetnsError(f"ip {' '.join(args)}: {message}")
    return result


def _ip_batch(netns: str | None, commands: Sequence[str]) -> None:
    """Several ip commands in one process (one fork instead of many), stopping at the first error."""
    where = ("-n", netns) if netns is not None else ()
    _ip(*where, "-batch", "-", input="\n".join(commands) + "\n")


def _link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name, check=False).returncode == 0


def _link_names() -> list[str]:
    return [link["ifname"] for link in json.loads(_ip("-j", "link", "show").stdout or "[]")]


def _addresses(link: str) -> set[str]:
    out = _ip("-j", "-4", "addr", "show", "dev", link).stdout
    return {f"{i['local']}/{i['prefixlen']}" for entry in json.loads(out or "[]") for i in entry.get("addr_info", [])}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"
