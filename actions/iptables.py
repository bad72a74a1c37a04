"""The pod's init rules: iptables REDIRECTs that send a pod's TCP through its sidecar.

Theory of operation
-------------------
Two chains of our own in the nat table, entered from one jump each:

    PREROUTING -p tcp -> MESHLOOM_INBOUND    RETURN for the sidecar's own ports (inbound, outbound, admin,
                                             metrics) and the ignored incoming ports; every other TCP connection
                                             to the pod is REDIRECTed to the inbound port
    OUTPUT     -p tcp -> MESHLOOM_OUTBOUND   RETURN for the proxy's uid (its own upstream connections must leave
                                             as they are), anything leaving through lo or to 127.0.0.0/8, the
                                             admin and metrics ports and the ignored outgoing ports; every other
                                             TCP connection the pod opens is REDIRECTed to the outbound port

REDIRECT keeps the original destination in conntrack, where the proxy reads it back with SO_ORIGINAL_DST. The nat
table only sees a connection's first packet, so replies and established connections are untouched. Only TCP is
redirected: UDP (DNS) is never touched, and TCP port 53 is ignored by default too.

Install is ONE `iptables-restore --noflush` call, so it applies atomically or not at all:
  - declaring `:MESHLOOM_INBOUND - [0:0]` creates the chain, or flushes it if it exists (both iptables-legacy and
    iptables-nft do so under --noflush), so the chains are always rebuilt from the settings, never appended to;
  - the jumps from the built-in chains do not depend on the settings. The current nat table is read first
    (`iptables-save -t nat`) and the jump is inserted only when it is missing; a duplicate, or any other jump to our
    chains, is deleted in the same call. Running install twice therefore gives the same table as running it once.
Two installs racing in one namespace could both insert the jump; the next install deletes the spare one.

Backends (USERS.md #7, legacy vs nft): the kernel has two iptables front ends that do not see each other's rules,
and using the wrong one beside a CNI's or kube-proxy's rules gives surprising results. `detect_backend` counts the
rules (other than ours) each holds in the namespace and picks the one in use; with none anywhere it picks nft (the
default of current distributions, Debian 12 here). After installing, our chains are removed from the other backend
if an earlier run left them there, so the two never redirect at once.

`render_rules`, `render_rules6` and `parse_ports` are pure; `install`, `remove` and `detect_backend` run the
iptables tools, inside a named network namespace when asked (`ip netns exec`). Errors are one line: `MissingTool`
(no iptables), `MissingPrivilege` (not root / no CAP_NET_ADMIN), `IptablesError` (the tool refused),
`InitConfigError` (bad settings, naming the flag or annotation).

IPv6 (ip6tables): the sidecar listens on IPv4 only, so IPv6 inbound TCP is not redirected but refused
(fail-closed): without this, in a dual-stack pod it would reach the application directly, past mutual TLS and access
control. One chain of our own in the ip6tables FILTER table, entered from one jump:

    INPUT -p tcp -> MESHLOOM_INBOUND6       RETURN for loopback (-i lo), established/related packets (the replies to
                                            the pod's own outbound IPv6 connections), the admin and metrics ports and
                                            the ignored incoming ports; every other TCP packet into the pod gets
                                            REJECT --reject-with tcp-reset

Installed with the same backend as the IPv4 rules (`ip6tables-<nft|legacy>-restore --noflush`), the same way
(chain declared = rebuilt, jump inserted once, duplicates deleted), after the IPv4 rules; removed with them. When
that ip6tables is not installed, the IPv4 rules are still installed and `InstallResult.ipv6_gap` says IPv6 is not
covered. Outbound IPv6 is left as it is: it is not proxied.

Pods without a sidecar (the single-host platform's `meshed: false`) get no redirect, but they still need Service
addresses to lead somewhere, as kube-proxy makes them do on Kubernetes. One chain of our own in the nat table:

    OUTPUT -> MESHLOOM_SERVICES            per Service port, DNAT to one of its endpoints, chosen at random per
                                           connection (TCP and UDP)

installed the same way (`install_services`: chain declared = rebuilt, jump inserted once).
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from actions.errors import MissingPrivilege, MissingTool, PermanentError
from catalog.world import ServiceRoute

INBOUND_CHAIN = "MESHLOOM_INBOUND"
OUTBOUND_CHAIN = "MESHLOOM_OUTBOUND"
CHAINS = (INBOUND_CHAIN, OUTBOUND_CHAIN)
INBOUND6_CHAIN = "MESHLOOM_INBOUND6"  # ip6tables, filter table
CHAINS6 = (INBOUND6_CHAIN,)
SERVICES_CHAIN = "MESHLOOM_SERVICES"  # nat table, pods without a sidecar: Service addresses to endpoints
# Each of our chains and the built-in chain that jumps to it.
_ENTRY = {INBOUND_CHAIN: "PREROUTING", OUTBOUND_CHAIN: "OUTPUT", INBOUND6_CHAIN: "INPUT", SERVICES_CHAIN: "OUTPUT"}
# The built-in chains of each table we use (a jump from one of our chains to another is not an entry jump).
_BUILTIN = {"nat": "PREROUTING|INPUT|OUTPUT|POSTROUTING", "filter": "INPUT|FORWARD|OUTPUT"}
_JUMP_SPEC = "-p tcp -j {chain}"  # as iptables-save prints it back, so that presence is an exact comparison
_JUMP_SPECS = {SERVICES_CHAIN: "-j {chain}"}  # TCP and UDP

DEFAULT_INBOUND_PORT = 15006
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_PROXY_UID = 2102
ADMIN_PORTS = (15021, 15090)  # readiness/liveness/shutdown and Prometheus: never redirected, in or out
DNS_PORTS = (53,)
_COMMAND_TIMEOUT = 30.0
_CAP_NET_ADMIN = 12


class InitConfigError(ValueError):
    """A setting init refuses: one line naming the flag or annotation, for the CLI to print as is."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class IptablesError(PermanentError):
    """iptables refused to do something (its own message, on one line), or a namespace does not exist."""


class BackendName(enum.StrEnum):
    nft = "nft"
    legacy = "legacy"


@dataclass(frozen=True, slots=True)
class Backend:
    """An iptables front end, and why it was chosen."""

    name: BackendName
    reason: str

    @property
    def save(self) -> str:
        return f"iptables-{self.name}-save"

    @property
    def restore(self) -> str:
        return f"iptables-{self.name}-restore"

    @property
    def save6(self) -> str:
        return f"ip6tables-{self.name}-save"

    @property
    def restore6(self) -> str:
        return f"ip6tables-{self.name}-restore"

    @property
    def has_ipv6(self) -> bool:
        return bool(shutil.which(self.save6) and shutil.which(self.restore6))


@dataclass(frozen=True, slots=True)
class InitSettings:
    """What init redirects. Ports are validated; ignored ports are kept sorted and unique."""

    inbound_port: int = DEFAULT_INBOUND_PORT
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    proxy_uid: int = DEFAULT_PROXY_UID
    admin_ports: tuple[int, ...] = ADMIN_PORTS
    ignore_incoming_ports: tuple[int, ...] = DNS_PORTS
    ignore_outgoing_ports: tuple[int, ...] = DNS_PORTS

    def __post_init__(self) -> None:
        for name in ("inbound_port", "outbound_port"):
            _check_port(getattr(self, name), name.replace("_", "-"))
        if self.inbound_port == self.outbound_port:
            raise InitConfigError(f"inbound-port and outbound-port are both {self.inbound_port}: they must differ")
        if not 0 <= self.proxy_uid < 2**32 - 1:
            raise InitConfigError(f"proxy-uid: {self.proxy_uid} is not a uid")
        for name in ("admin_ports", "ignore_incoming_ports", "ignore_outgoing_ports"):
            ports = tuple(sorted(set(getattr(self, name))))
            for port in ports:
                _check_port(port, name.replace("_", "-"))
            object.__setattr__(self, name, ports)

    @property
    def inbound_exempt(self) -> tuple[int, ...]:
        """Destination ports of connections into the pod that are never redirected."""
        own = {self.inbound_port, self.outbound_port, *self.admin_ports}
        return tuple(sorted(own | set(self.ignore_incoming_ports)))

    @property
    def inbound6_allowed(self) -> tuple[int, ...]:
        """Destination ports of IPv6 connections into the pod that are not refused (nothing listens on IPv6 for
        the inbound and outbound ports: the sidecar is IPv4 only)."""
        return tuple(sorted(set(self.admin_ports) | set(self.ignore_incoming_ports)))

    @property
    def outbound_exempt(self) -> tuple[int, ...]:
        """Destination ports of connections out of the pod that are never redirected."""
        return tuple(sorted(set(self.admin_ports) | set(self.ignore_outgoing_ports)))


def _check_port(port: object, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InitConfigError(f"{what}: {port!r} is not a port (1-65535)")


def parse_ports(text: str, *, source: str) -> tuple[int, ...]:
    """"80,443, 8080" -> (80, 443, 8080), sorted and unique; "" -> (). `source` names the flag or annotation in
    the one-line error, e.g. "--ignore-incoming-ports" or "annotation config.nsm.nginx.com/ignore-incoming-ports"."""
    if not text.strip():
        return ()
    ports: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item.isdecimal() or not 1 <= int(item) <= 65535:
            raise InitConfigError(f"{source}: {item!r} is not a port (1-65535) in {text!r}; expected a "
                                  f"comma-separated list such as 80,443")
        ports.add(int(item))
    return tuple(sorted(ports))


# -- rendering (pure) ------------------------------------------------------------------------------------------


def jump_rule(chain: str) -> str:
    """Our jump as iptables-save prints it: `-A PREROUTING -p tcp -j MESHLOOM_INBOUND`."""
    return f"-A {_ENTRY[chain]} {_JUMP_SPECS.get(chain, _JUMP_SPEC).format(chain=chain)}"


def _jumps_to_ours(existing: str, table: str = "nat", chains: Sequence[str] = CHAINS) -> list[str]:
    """Every rule of a built-in chain of the saved table whose target is one of our chains, in order."""
    targets = "|".join(chains)
    pattern = re.compile(rf"-A ({_BUILTIN[table]}) .*-[jg] ({targets})(\s|$)")
    return [line.strip() for line in _section(existing, table) if pattern.match(line.strip())]


def _section(saved: str, table: str) -> list[str]:
    lines, inside = [], False
    for line in saved.splitlines():
        if line.startswith("*"):
            inside = line.strip() == f"*{table}"
        elif inside:
            lines.append(line)
    return lines


def _chains_present(saved: str, table: str = "nat", chains: Sequence[str] = CHAINS) -> list[str]:
    declared = {line[1:].split()[0] for line in _section(saved, table) if line.startswith(":")}
    return [c for c in chains if c in declared]


def render_rules(settings: InitSettings, *, existing: str = "") -> str:
    """The `iptables-restore --noflush` input for the nat table. `existing` is the namespace's current
    `iptables-save -t nat` output: jumps already there are not added again, spare ones are deleted. With no
    `existing` (a fresh namespace, or --dry-run) the jumps are inserted."""
    s = settings
    lines = [
        f"# meshloom init: inbound TCP -> {s.inbound_port}, outbound TCP -> {s.outbound_port} "
        f"(uid {s.proxy_uid} exempt); not redirected: in {_ports(s.inbound_exempt)}, out {_ports(s.outbound_exempt)}",
        "*nat",
        *(f":{chain} - [0:0]" for chain in CHAINS),  # creates the chain, or flushes it (--noflush keeps the rest)
    ]
    lines += [f"-A {INBOUND_CHAIN} -p tcp --dport {port} -j RETURN" for port in s.inbound_exempt]
    lines.append(f"-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {s.inbound_port}")
    lines += [
        # The proxy calling its own pod (a Service whose endpoint is this pod): the connection never crosses
        # PREROUTING (it loops over lo), so it would reach the application as mutual TLS. Send it through the
        # inbound chain instead, as if it came from outside, with the same exempt ports.
        f"-A {OUTBOUND_CHAIN} -o lo ! -d 127.0.0.0/8 -m owner --uid-owner {s.proxy_uid} -j {INBOUND_CHAIN}",
        f"-A {OUTBOUND_CHAIN} -m owner --uid-owner {s.proxy_uid} -j RETURN",  # the proxy's own upstream traffic
        f"-A {OUTBOUND_CHAIN} -o lo -j RETURN",  # to the pod itself (incl. its own address) and the sidecar
        f"-A {OUTBOUND_CHAIN} -d 127.0.0.0/8 -j RETURN",
    ]
    lines += [f"-A {OUTBOUND_CHAIN} -p tcp --dport {port} -j RETURN" for port in s.outbound_exempt]
    lines.append(f"-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {s.outbound_port}")
    lines += _jump_changes(existing)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_rules6(settings: InitSettings, *, existing: str = "") -> str:
    """The `ip6tables-restore --noflush` input for the filter table: IPv6 inbound TCP refused, except loopback,
    replies and the allowed ports. `existing` is the namespace's `ip6tables-save -t filter` output, as for
    `render_rules`."""
    s = settings
    chain = INBOUND6_CHAIN
    lines = [
        f"# meshloom init (IPv6): inbound TCP refused (tcp-reset) except loopback, replies and ports "
        f"{_ports(s.inbound6_allowed)}; outbound IPv6 is not proxied",
        "*filter",
        f":{chain} - [0:0]",
        f"-A {chain} -i lo -j RETURN",  # the pod talking to itself ([::1], its own addresses)
        # Replies to the pod's own outbound IPv6 connections (and ICMPv6 errors about them) must come in.
        f"-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
    ]
    lines += [f"-A {chain} -p tcp --dport {port} -j RETURN" for port in s.inbound6_allowed]
    # A reset rather than a silent drop: a dual-stack client falls back to IPv4 (through the sidecar) at once.
    lines.append(f"-A {chain} -p tcp -j REJECT --reject-with tcp-reset")
    lines += _jump_changes(existing, "filter", CHAINS6)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_service_rules(routes: Sequence[ServiceRoute], *, existing: str = "") -> str:
    """The `iptables-restore --noflush` input that routes a pod's connections to Service addresses, for a pod
    without a sidecar: each connection (its first packet; conntrack does the rest) is DNATed to one endpoint, the
    i-th of n with probability 1/(n-i) so that each gets 1/n, as kube-proxy's iptables mode does. `existing` as for
    `render_rules`."""
    lines = [f"# meshloom services: {len(routes)} Service port(s) routed to their endpoints", "*nat",
             f":{SERVICES_CHAIN} - [0:0]"]
    for r in routes:
        match = f"-A {SERVICES_CHAIN} -d {r.address}/32 -p {r.transport} -m {r.transport} --dport {r.port}"
        for i, (ip, port) in enumerate(r.endpoints):
            left = len(r.endpoints) - i
            pick = f" -m statistic --mode random --probability {1 / left:.11f}" if left > 1 else ""
            lines.append(f"{match}{pick} -j DNAT --to-destination {ip}:{port}")
    lines += _jump_changes(existing, "nat", (SERVICES_CHAIN,))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _jump_changes(existing: str, table: str = "nat", chains: Sequence[str] = CHAINS) -> list[str]:
    """Insert each missing jump; delete duplicates and any other rule that jumps to our chains."""
    changes: list[str] = []
    kept: set[str] = set()
    for rule in _jumps_to_ours(existing, table, chains):
        if rule in {jump_rule(c) for c in chains} and rule not in kept:
            kept.add(rule)
        else:
            changes.append("-D" + rule[2:])
    for chain in chains:
        if jump_rule(chain) not in kept:
            changes.append(f"-I{jump_rule(chain)[2:]}")  # first in its chain: ahead of anything else's rules
    return changes


def render_removal(existing: str, *, table: str = "nat", chains: Sequence[str] = CHAINS) -> str | None:
    """The `iptables-restore --noflush` input that deletes our jumps and chains; None when there is nothing.
    For IPv6: `render_removal(saved, table="filter", chains=CHAINS6)`."""
    present = _chains_present(existing, table, chains)
    jumps = _jumps_to_ours(existing, table, chains)
    if not present and not jumps:
        return None
    lines = [f"*{table}", *("-D" + rule[2:] for rule in jumps)]
    lines += [f"-F {chain}" for chain in present]
    lines += [f"-X {chain}" for chain in present]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _ports(ports: Iterable[int]) -> str:
    return ",".join(map(str, ports)) or "-"


# -- the host ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstallResult:
    backend: Backend
    netns: str | None
    rules: str  # exactly what was given to iptables-restore
    cleaned_other_backend: bool = False  # our chains were also found (and removed) in the other backend
    rules6: str | None = None  # exactly what was given to ip6tables-restore; None when IPv6 was not covered
    ipv6_gap: str = ""  # why IPv6 inbound TCP is not refused (one line); "" when it is


def count_rules(saved: str) -> int:
    """Rules in an iptables-save output, ours not counted (they say nothing about what the host uses)."""
    return sum(1 for line in saved.splitlines() if line.startswith("-A ") and "MESHLOOM_" not in line)


def detect_backend(netns: str | None = None) -> Backend:
    """The iptables front end this namespace (the host's when None) uses: the one holding rules, else nft."""
    installed = [b for b in BackendName if _installed(b)]
    if not installed:
        raise MissingTool("iptables is not installed (neither iptables-nft-restore nor iptables-legacy-restore): "
                          "apt-get install iptables")
    if len(installed) == 1:
        return Backend(installed[0], f"only iptables-{installed[0]} is installed")
    _check_privilege()
    counts = {b: count_rules(_run(netns, [f"iptables-{b}-save"]).stdout) for b in installed}
    where = f"network namespace {netns}" if netns else "the host"
    summary = ", ".join(f"iptables-{b} {n}" for b, n in counts.items())
    if counts[BackendName.nft] == counts[BackendName.legacy] == 0:
        return Backend(BackendName.nft, f"no rules in {where} yet ({summary}): nft by default")
    chosen = max(installed, key=lambda b: (counts[b], b == BackendName.nft))  # a tie goes to nft
    return Backend(chosen, f"rules already in {where}: {summary}")


def _installed(name: BackendName) -> bool:
    return bool(shutil.which(f"iptables-{name}-save") and shutil.which(f"iptables-{name}-restore"))


def backend_named(name: str) -> Backend:
    try:
        chosen = BackendName(name)
    except ValueError:
        raise InitConfigError(f"backend: {name!r} is not one of auto, nft, legacy") from None
    if not shutil.which(f"iptables-{chosen}-restore"):
        raise MissingTool(f"iptables-{chosen}-restore is not installed: apt-get install iptables")
    return Backend(chosen, "chosen by the caller")


def saved_nat(backend: Backend, netns: str | None = None) -> str:
    return _run(netns, [backend.save, "-t", "nat"]).stdout


def saved_filter6(backend: Backend, netns: str | None = None) -> str:
    return _run(netns, [backend.save6, "-t", "filter"]).stdout


def _kernel_has_ipv6() -> bool:
    return Path("/proc/net/if_inet6").exists()  # absent in every namespace when the kernel has no IPv6


def install(settings: InitSettings, netns: str | None = None, backend: Backend | None = None) -> InstallResult:
    """Install (or refresh) the redirect rules in one atomic iptables-restore; idempotent."""
    _check_privilege()
    chosen = backend or detect_backend(netns)
    rules = render_rules(settings, existing=saved_nat(chosen, netns))
    _run(netns, [chosen.restore, "--noflush"], input=rules)
    rules6, gap = None, ""
    if not _kernel_has_ipv6():  # booted with ipv6.disable=1: there is no IPv6 to get around the sidecar with
        gap = "the kernel has no IPv6: there is no IPv6 inbound TCP to refuse"
    elif chosen.has_ipv6:  # same backend as IPv4: the two front ends do not see each other's rules
        rules6 = render_rules6(settings, existing=saved_filter6(chosen, netns))
        _run(netns, [chosen.restore6, "--noflush"], input=rules6)  # a refusal raises: fail-closed
    else:
        gap = (f"{chosen.restore6} is not installed: IPv6 inbound TCP is not refused (IPv4 rules installed; "
               f"apt-get install iptables)")
    cleaned = False
    other = BackendName.legacy if chosen.name is BackendName.nft else BackendName.nft
    if _installed(other):
        cleaned = _remove_from(Backend(other, "the other backend"), netns)
    return InstallResult(chosen, netns, rules, cleaned, rules6, gap)


def install_services(routes: Sequence[ServiceRoute], netns: str | None = None,
                     backend: Backend | None = None) -> str:
    """Route Service addresses to their endpoints (a pod without a sidecar) in one atomic iptables-restore;
    idempotent, and the chain is rebuilt each time, so a route that went is gone. Returns the rules given."""
    _check_privilege()
    chosen = backend or detect_backend(netns)
    rules = render_service_rules(routes, existing=saved_nat(chosen, netns))
    _run(netns, [chosen.restore, "--noflush"], input=rules)
    return rules


def remove(netns: str | None = None) -> list[Backend]:
    """Delete our jumps and chains (the Service routes too) from every backend that has them; returns those.
    Idempotent."""
    _check_privilege()
    removed = []
    for name in BackendName:
        if _installed(name):
            backend = Backend(name, "removal")
            if _remove_from(backend, netns):
                removed.append(backend)
    if not removed and not any(shutil.which(f"iptables-{n}-restore") for n in BackendName):
        raise MissingTool("iptables is not installed: apt-get install iptables")
    return removed


def _remove_from(backend: Backend, netns: str | None) -> bool:
    """Our IPv4 chains and jumps, and the IPv6 ones when that ip6tables is installed; whether there were any."""
    found = False
    removal = render_removal(saved_nat(backend, netns), chains=(*CHAINS, SERVICES_CHAIN))
    if removal is not None:
        _run(netns, [backend.restore, "--noflush"], input=removal)
        found = True
    if backend.has_ipv6:
        removal6 = render_removal(saved_filter6(backend, netns), table="filter", chains=CHAINS6)
        if removal6 is not None:
            _run(netns, [backend.restore6, "--noflush"], input=removal6)
            found = True
    return found


def _check_privilege() -> None:
    if os.geteuid() == 0:
        return
    try:
        status = Path("/proc/self/status").read_text()
        caps = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        caps = 0
    if not caps >> _CAP_NET_ADMIN & 1:
        raise MissingPrivilege(f"changing iptables needs root or CAP_NET_ADMIN (and NET_RAW for iptables-legacy); "
                               f"running as uid {os.geteuid()} without them")


def _run(netns: str | None, argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [*(("ip", "netns", "exec", netns) if netns else ()), *argv]
    try:
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT,
                                check=False)
    except FileNotFoundError:
        tool = "ip (iproute2)" if netns else argv[0]
        raise MissingTool(f"{tool} is not installed: apt-get install {'iproute2' if netns else 'iptables'}") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{argv[0]}: no answer within {_COMMAND_TIMEOUT:g}s") from None
    if result.returncode == 0:
        return result
    err = result.stderr
    if netns and "Cannot open network namespace" in err:
        raise IptablesError(f"network namespace {netns!r} does not exist (ip netns list)")
    if netns and f'exec of "{argv[0]}" failed' in err:
        raise MissingTool(f"{argv[0]} is not installed: apt-get install iptables")
    if "Permission denied" in err or "Operation not permitted" in err:
        raise MissingPrivilege(f"{argv[0]}: {_first_line(err)} (needs root or CAP_NET_ADMIN)")
    line = re.search(r"Error occurred at line: (\d+)", err)
    where = f" at line {line.group(1)} of the rules" if line else ""
    raise IptablesError(f"{argv[0]} failed{where}: {_first_line(err)}")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"
