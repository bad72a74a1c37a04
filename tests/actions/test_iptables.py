"""The init rules (actions.iptables): rendered rules against golden files, port lists, and the real thing in pods
made with the `host_network` fixture: REDIRECTs proven by listeners that report SO_ORIGINAL_DST, and IPv6 inbound
TCP refused in pods given an IPv6 address (fd00::/8, random per run) besides their IPv4 one.

Golden files: tests/actions/golden/iptables/*.rules; MESHLOOM_UPDATE_GOLDEN=1 rewrites them (review the diff).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from actions import iptables
from actions.errors import MissingTool
from actions.iptables import (
    Backend,
    BackendName,
    InitConfigError,
    InitSettings,
    IptablesError,
    backend_named,
    detect_backend,
    install,
    install_services,
    parse_ports,
    remove,
    render_removal,
    render_rules,
    render_rules6,
    render_service_rules,
)
from actions.netns import HostNetwork, NetnsError, PodNet, run
from catalog.world import ServiceRoute
from tests.support.netns import connect, start_listener

GOLDEN = Path(__file__).parent / "golden" / "iptables"
UPDATE = os.environ.get("MESHLOOM_UPDATE_GOLDEN") == "1"
NOBODY = 65534  # an unprivileged workload
PROXY = 2102

CASES = {
    "defaults": InitSettings(),
    "ignored-ports": InitSettings(ignore_incoming_ports=(53, 3306, 8443), ignore_outgoing_ports=(53, 5432, 6379)),
    "custom-ports": InitSettings(inbound_port=16006, outbound_port=16001, proxy_uid=1337, admin_ports=(16021,),
                                 ignore_incoming_ports=(), ignore_outgoing_ports=(53,)),
}
CASES6 = {"defaults6": CASES["defaults"], "ignored-ports6": CASES["ignored-ports"]}


# -- rendering -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_rendered_rules_match_the_golden_file(case: str) -> None:
    path = GOLDEN / f"{case}.rules"
    rendered = render_rules(CASES[case])
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
    assert path.exists(), f"{path} is missing: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/actions/test_iptables.py"
    assert rendered == path.read_text(), (
        f"{path} is stale: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/actions/test_iptables.py and review the diff")


@pytest.mark.parametrize("case", sorted(CASES6))
def test_the_rendered_ipv6_rules_match_the_golden_file(case: str) -> None:
    path = GOLDEN / f"{case}.rules"
    rendered = render_rules6(CASES6[case])
    if UPDATE:
        path.write_text(rendered)
    assert path.exists(), f"{path} is missing: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/actions/test_iptables.py"
    assert rendered == path.read_text(), (
        f"{path} is stale: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/actions/test_iptables.py and review the diff")


ROUTES = (ServiceRoute("10.96.0.10", 53, "udp", (("10.1.0.5", 5353),)),
          ServiceRoute("10.96.0.11", 80, "tcp", (("10.1.0.2", 8080), ("10.1.0.3", 8080), ("10.1.0.4", 8080))))


def test_the_rendered_service_routes_match_the_golden_file() -> None:
    path = GOLDEN / "services.rules"
    rendered = render_service_rules(ROUTES)
    if UPDATE:
        path.write_text(rendered)
    assert path.exists(), f"{path} is missing: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/actions/test_iptables.py"
    assert rendered == path.read_text(), (
        f"{path} is stale: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/actions/test_iptables.py and review the diff")


def test_each_of_n_endpoints_gets_one_nth_of_the_connections() -> None:
    # The i-th rule sees what the ones before it left: (1 - 1/3) * (1 - 1/2) = 1/3 reaches the last, and so on.
    rules = [line for line in render_service_rules(ROUTES).splitlines() if "--dport 80 " in line]
    assert [r.split("--probability ")[1].split()[0] if "--probability" in r else None for r in rules] == [
        "0.33333333333", "0.50000000000", None]
    assert render_service_rules(ROUTES, existing="*nat\n-A OUTPUT -j MESHLOOM_SERVICES\nCOMMIT\n").count("-I ") == 0


def test_the_ipv6_rules_allow_loopback_replies_and_the_admin_and_ignored_ports_and_reset_the_rest() -> None:
    rules = render_rules6(InitSettings(ignore_incoming_ports=(53, 9100))).splitlines()
    chain = [line for line in rules if line.startswith("-A MESHLOOM_INBOUND6")]
    assert chain == ["-A MESHLOOM_INBOUND6 -i lo -j RETURN",
                     "-A MESHLOOM_INBOUND6 -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
                     *(f"-A MESHLOOM_INBOUND6 -p tcp --dport {port} -j RETURN" for port in (53, 9100, 15021, 15090)),
                     "-A MESHLOOM_INBOUND6 -p tcp -j REJECT --reject-with tcp-reset"]
    assert rules[1] == "*filter" and "-I INPUT -p tcp -j MESHLOOM_INBOUND6" in rules


def test_an_ipv6_jump_in_place_is_kept_and_a_duplicate_deleted() -> None:
    existing = "\n".join(["*nat", "-A PREROUTING -p tcp -j MESHLOOM_INBOUND6", "COMMIT", "*filter",
                          "-A INPUT -p tcp -j MESHLOOM_INBOUND6", "-A INPUT -p tcp -j MESHLOOM_INBOUND6", "COMMIT"])
    changes = [line for line in render_rules6(InitSettings(), existing=existing).splitlines()
               if line.startswith(("-I ", "-D "))]
    assert changes == ["-D INPUT -p tcp -j MESHLOOM_INBOUND6"]


def test_ipv6_removal_deletes_the_jump_then_the_chain_of_the_filter_table() -> None:
    existing = ("*filter\n:INPUT ACCEPT [0:0]\n:MESHLOOM_INBOUND6 - [0:0]\n-A INPUT -p tcp -j MESHLOOM_INBOUND6\n"
                "COMMIT\n")
    assert render_removal(existing, table="filter", chains=iptables.CHAINS6) == (
        "*filter\n-D INPUT -p tcp -j MESHLOOM_INBOUND6\n-F MESHLOOM_INBOUND6\n-X MESHLOOM_INBOUND6\nCOMMIT\n")
    assert render_removal(existing) is None  # the nat table (IPv4) has nothing of ours


def test_jumps_already_in_place_are_not_added_again() -> None:
    existing = "*nat\n" + "\n".join(iptables.jump_rule(c) for c in iptables.CHAINS) + "\nCOMMIT\n"
    rules = render_rules(InitSettings(), existing=existing)
    assert "-I " not in rules and "-D " not in rules
    assert ":MESHLOOM_INBOUND - [0:0]" in rules  # the chains are still declared, so they are rebuilt


def test_a_duplicate_or_foreign_jump_to_our_chains_is_deleted_in_the_same_restore() -> None:
    existing = "\n".join(["*filter", "-A OUTPUT -p tcp -j MESHLOOM_OUTBOUND", "COMMIT", "*nat",
                          "-A PREROUTING -p tcp -j MESHLOOM_INBOUND",
                          "-A OUTPUT -p tcp -j MESHLOOM_OUTBOUND", "-A OUTPUT -p tcp -j MESHLOOM_OUTBOUND",
                          "-A OUTPUT -d 192.0.2.0/24 -j MESHLOOM_OUTBOUND", "-A OUTPUT -p tcp -j OTHER", "COMMIT"])
    changes = [line for line in render_rules(InitSettings(), existing=existing).splitlines()
               if line.startswith(("-I ", "-D "))]
    assert changes == ["-D OUTPUT -p tcp -j MESHLOOM_OUTBOUND", "-D OUTPUT -d 192.0.2.0/24 -j MESHLOOM_OUTBOUND"]


def test_removal_deletes_jumps_before_flushing_and_deleting_the_chains() -> None:
    existing = "*nat\n:PREROUTING ACCEPT [0:0]\n:MESHLOOM_INBOUND - [0:0]\n:MESHLOOM_OUTBOUND - [0:0]\n" \
               "-A PREROUTING -p tcp -j MESHLOOM_INBOUND\n-A MESHLOOM_INBOUND -p tcp -j REDIRECT --to-ports 15006\n" \
               "COMMIT\n"
    assert render_removal(existing) == ("*nat\n-D PREROUTING -p tcp -j MESHLOOM_INBOUND\n-F MESHLOOM_INBOUND\n"
                                        "-F MESHLOOM_OUTBOUND\n-X MESHLOOM_INBOUND\n-X MESHLOOM_OUTBOUND\nCOMMIT\n")
    assert render_removal("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") is None


def test_the_sidecars_own_ports_and_dns_are_exempt_by_default() -> None:
    s = InitSettings()
    assert s.inbound_exempt == (53, 15001, 15006, 15021, 15090)
    assert s.outbound_exempt == (53, 15021, 15090)


# -- port lists and settings -------------------------------------------------------------------------------------


def test_a_port_list_is_parsed_sorted_and_unique() -> None:
    assert parse_ports("80,443, 8080", source="--ignore-incoming-ports") == (80, 443, 8080)
    assert parse_ports(" 8080 ,80,80", source="x") == (80, 8080)
    assert parse_ports("", source="x") == ()
    assert parse_ports("  ", source="x") == ()


@pytest.mark.parametrize("text", ["80,http", "0", "65536", "80,,443", "80;443", "-1", "8000-8010", "80,"])
def test_a_bad_port_list_is_one_line_naming_its_source(text: str) -> None:
    source = "annotation config.nsm.nginx.com/ignore-outgoing-ports"
    with pytest.raises(InitConfigError) as caught:
        parse_ports(text, source=source)
    message = str(caught.value)
    assert message.startswith(f"{source}: ") and "\n" not in message and "comma-separated" in message


def test_settings_refuse_equal_redirect_ports_and_bad_ports() -> None:
    with pytest.raises(InitConfigError, match="must differ"):
        InitSettings(inbound_port=15001)
    with pytest.raises(InitConfigError, match="outbound-port: 0 is not a port"):
        InitSettings(outbound_port=0)
    with pytest.raises(InitConfigError, match="ignore-incoming-ports: 70000"):
        InitSettings(ignore_incoming_ports=(70000,))
    assert InitSettings(ignore_outgoing_ports=(443, 53, 443)).ignore_outgoing_ports == (53, 443)


def test_no_iptables_at_all_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingTool, match="iptables is not installed"):
        detect_backend()


def test_an_unknown_backend_name_is_refused() -> None:
    with pytest.raises(InitConfigError, match="backend: 'iptables' is not one of auto, nft, legacy"):
        backend_named("iptables")


# -- in real network namespaces ------------------------------------------------------------------------------------


def _save(pod: PodNet, backend: str = "nft") -> str:
    """The nat table without the timestamp comments, to compare two states."""
    out = run(pod, [f"iptables-{backend}-save", "-t", "nat"]).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


def _save6(pod: PodNet, backend: str = "nft") -> str:
    """The ip6tables filter table without the timestamp comments."""
    out = run(pod, [f"ip6tables-{backend}-save", "-t", "filter"]).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


@pytest.fixture
def two_pods(host_network: HostNetwork) -> Iterator[tuple[PodNet, PodNet]]:
    yield host_network.add_pod("client"), host_network.add_pod("server")


class Listeners:
    """Listeners that report where a connection landed; all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, pod: PodNet, port: int, uid: int | None = None, host: str = "0.0.0.0") -> None:
        self.procs.append(start_listener(pod, port, host=host, uid=uid))

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.communicate(timeout=10)


@pytest.fixture
def dual_stack(two_pods: tuple[PodNet, PodNet]) -> tuple[tuple[PodNet, str], tuple[PodNet, str]]:
    """The two pods, each also with an IPv6 address in a random fd00::/64 (gone with the namespaces)."""
    network = f"fd00:{secrets.token_hex(2)}:{secrets.token_hex(2)}:{secrets.token_hex(2)}"
    pods = []
    for pod, host in zip(two_pods, ("2", "3"), strict=True):
        address = str(ipaddress.IPv6Address(f"{network}::{host}"))  # compressed, as sockets print it
        try:
            for knob in ("all", "default", "eth0"):
                run(pod, ["sysctl", "-q", "-w", f"net.ipv6.conf.{knob}.disable_ipv6=0"])
            run(pod, ["ip", "-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad"])
        except NetnsError as exc:
            pytest.skip(f"IPv6 is not available in a network namespace here: {exc}")
        pods.append((pod, address))
    return pods[0], pods[1]


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    group = Listeners()
    try:
        yield group
    finally:
        group.close()


@pytest.mark.integration
def test_installing_twice_gives_the_same_table(two_pods: tuple[PodNet, PodNet]) -> None:
    client, _ = two_pods
    first = install(InitSettings(), netns=client.netns)
    assert first.backend.name is BackendName.nft and "no rules" in first.backend.reason
    once = _save(client)
    assert "-A PREROUTING -p tcp -j MESHLOOM_INBOUND" in once and "-A OUTPUT -p tcp -j MESHLOOM_OUTBOUND" in once
    second = install(InitSettings(), netns=client.netns)
    assert _save(client) == once
    assert "-I " not in second.rules  # the jumps were seen and left alone
    # Other settings rebuild the chains (not appended to), and going back gives the first table again.
    install(InitSettings(ignore_outgoing_ports=(53, 5432)), netns=client.netns)
    assert "--dport 5432" in _save(client)
    install(InitSettings(), netns=client.netns)
    assert _save(client) == once


@pytest.mark.integration
def test_a_duplicated_jump_is_healed_by_the_next_install(two_pods: tuple[PodNet, PodNet]) -> None:
    client, _ = two_pods
    install(InitSettings(), netns=client.netns)
    once = _save(client)
    run(client, ["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "MESHLOOM_OUTBOUND"])
    assert _save(client).count("-j MESHLOOM_OUTBOUND") == 2
    install(InitSettings(), netns=client.netns)
    assert _save(client) == once


@pytest.mark.integration
def test_outbound_tcp_of_the_workload_lands_on_the_outbound_port_with_its_original_destination(
        two_pods: tuple[PodNet, PodNet], listeners: Listeners) -> None:
    client, server = two_pods
    install(InitSettings(), netns=client.netns)
    listeners.start(client, 15001, uid=PROXY)  # the sidecar's outbound listener
    for port in (8080, 53, 15021, 15090):
        listeners.start(server, port)
    # The workload's connection to another pod is redirected; the proxy can recover where it was going.
    assert connect(client, server.ip, 8080, uid=NOBODY) == f"127.0.0.1:15001 {server.ip}:8080"
    # The proxy's own connection (uid 2102) goes out as it is.
    assert connect(client, server.ip, 8080, uid=PROXY).split()[0] == f"{server.ip}:8080"
    # DNS over TCP and the admin/metrics ports of other pods are never redirected.
    for port in (53, 15021, 15090):
        assert connect(client, server.ip, port, uid=NOBODY).split()[0] == f"{server.ip}:{port}"


@pytest.mark.integration
def test_loopback_traffic_inside_the_pod_is_not_redirected(two_pods: tuple[PodNet, PodNet],
                                                           listeners: Listeners) -> None:
    client, _ = two_pods
    install(InitSettings(), netns=client.netns)
    listeners.start(client, 15001, uid=PROXY)
    listeners.start(client, 8080, uid=NOBODY)  # the application
    assert connect(client, "127.0.0.1", 8080, uid=NOBODY).split()[0] == "127.0.0.1:8080"
    assert connect(client, client.ip, 8080, uid=NOBODY).split()[0] == f"{client.ip}:8080"  # own address, via lo


@pytest.mark.integration
def test_the_proxy_calling_its_own_pod_goes_through_the_inbound_port_like_a_connection_from_outside(
        two_pods: tuple[PodNet, PodNet], listeners: Listeners) -> None:
    # A Service whose endpoint is the calling pod itself: the proxy's mutual-TLS connection to its own address
    # must reach its inbound side, not the application.
    pod, _ = two_pods
    install(InitSettings(), netns=pod.netns)
    listeners.start(pod, 15006, uid=PROXY)
    for port in (8080, 15021):
        listeners.start(pod, port, uid=NOBODY)
    # (REDIRECT in OUTPUT lands on loopback; the original destination is what the proxy routes by)
    assert connect(pod, pod.ip, 8080, uid=PROXY) == f"127.0.0.1:15006 {pod.ip}:8080"
    assert connect(pod, pod.ip, 15021, uid=PROXY).split()[0] == f"{pod.ip}:15021"  # exempt ports stay exempt
    assert connect(pod, "127.0.0.1", 8080, uid=PROXY).split()[0] == "127.0.0.1:8080"  # the proxy to its app


@pytest.mark.integration
def test_inbound_tcp_to_the_apps_port_lands_on_the_inbound_port_and_admin_ports_are_left_alone(
        two_pods: tuple[PodNet, PodNet], listeners: Listeners) -> None:
    client, server = two_pods
    install(InitSettings(ignore_incoming_ports=(53, 9100)), netns=client.netns)
    listeners.start(client, 15006, uid=PROXY)  # the sidecar's inbound listener
    for port in (8080, 53, 9100, 15021, 15090):
        listeners.start(client, port)
    assert connect(server, client.ip, 8080, uid=NOBODY) == f"{client.ip}:15006 {client.ip}:8080"
    for port in (53, 9100, 15021, 15090):  # DNS, an ignored port, readiness and metrics reach their listeners
        assert connect(server, client.ip, port, uid=NOBODY).split()[0] == f"{client.ip}:{port}"


@pytest.mark.integration
def test_remove_leaves_no_meshloom_chain_and_is_idempotent(two_pods: tuple[PodNet, PodNet],
                                                           listeners: Listeners) -> None:
    client, server = two_pods
    install(InitSettings(), netns=client.netns)
    assert [b.name for b in remove(netns=client.netns)] == [BackendName.nft]
    assert "MESHLOOM" not in _save(client) and "MESHLOOM" not in _save(client, "legacy")
    assert "MESHLOOM" not in _save6(client) and "MESHLOOM" not in _save6(client, "legacy")
    assert remove(netns=client.netns) == []
    listeners.start(server, 8080)
    assert connect(client, server.ip, 8080, uid=NOBODY).split()[0] == f"{server.ip}:8080"  # no redirect any more


@pytest.mark.integration
def test_the_backend_already_holding_rules_is_detected_and_the_other_one_is_cleaned(
        two_pods: tuple[PodNet, PodNet]) -> None:
    client, _ = two_pods
    # A CNI that uses iptables-legacy in this pod: init follows it.
    run(client, ["iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT"])
    detected = detect_backend(client.netns)
    assert detected.name is BackendName.legacy and "iptables-legacy 1" in detected.reason
    result = install(InitSettings(), netns=client.netns)
    assert result.backend.name is BackendName.legacy and "MESHLOOM_OUTBOUND" in _save(client, "legacy")
    assert "MESHLOOM_INBOUND6" in _save6(client, "legacy") and "MESHLOOM" not in _save6(client, "nft")
    # Told to use nft later, our chains move: they are never left in both.
    moved = install(InitSettings(), netns=client.netns, backend=Backend(BackendName.nft, "test"))
    assert moved.cleaned_other_backend
    assert "MESHLOOM" not in _save(client, "legacy") and "MESHLOOM_OUTBOUND" in _save(client, "nft")
    assert "MESHLOOM" not in _save6(client, "legacy") and "MESHLOOM_INBOUND6" in _save6(client, "nft")
    remove(netns=client.netns)
    assert "MESHLOOM" not in _save(client, "nft") and "MESHLOOM" not in _save6(client, "nft")


@pytest.mark.integration
def test_a_namespace_that_does_not_exist_is_one_clear_line(host_network: HostNetwork) -> None:
    missing = host_network.netns_name("absent")
    with pytest.raises(IptablesError, match=f"network namespace '{missing}' does not exist"):
        install(InitSettings(), netns=missing)


@pytest.mark.integration
def test_ipv6_inbound_tcp_is_refused_except_admin_and_ignored_ports_while_the_pods_own_connections_complete(
        dual_stack: tuple[tuple[PodNet, str], tuple[PodNet, str]], listeners: Listeners) -> None:
    (pod, pod6), (other, other6) = dual_stack
    for port in (8080, 9100, 15021):
        listeners.start(pod, port, uid=NOBODY, host="::")
    listeners.start(other, 8080, uid=NOBODY, host="::")

    def landed(source: PodNet, host: str, port: int) -> str:
        """Where an IPv6 connection landed ("<local address>:<port>"), or "refused"/"timeout"."""
        return connect(source, host, port, uid=NOBODY).split()[0]

    assert landed(other, pod6, 8080) == f"{pod6}:8080"  # without the rules, IPv6 reaches the application directly
    result = install(InitSettings(ignore_incoming_ports=(53, 9100)), netns=pod.netns)
    assert result.rules6 is not None and result.ipv6_gap == ""
    assert landed(other, pod6, 8080) == "refused"  # a reset: the sidecar is not on IPv6, so nothing may pass
    assert landed(other, pod6, 15021) == f"{pod6}:15021"  # readiness/liveness
    assert landed(other, pod6, 9100) == f"{pod6}:9100"  # an ignored incoming port
    # The pod's own outbound IPv6 connection gets its replies (not proxied), and loopback is left alone.
    assert landed(pod, other6, 8080) == f"{other6}:8080"
    assert landed(pod, "::1", 8080) == "::1:8080"
    assert landed(pod, pod6, 8080) == f"{pod6}:8080"  # its own address, over lo


@pytest.mark.integration
def test_ipv6_rules_are_idempotent_healed_and_removed(two_pods: tuple[PodNet, PodNet]) -> None:
    client, _ = two_pods
    install(InitSettings(), netns=client.netns)
    once = _save6(client)
    assert "-A INPUT -p tcp -j MESHLOOM_INBOUND6" in once and "--reject-with tcp-reset" in once
    second = install(InitSettings(), netns=client.netns)
    assert _save6(client) == once and second.rules6 is not None and "-I " not in second.rules6
    run(client, ["ip6tables-nft", "-A", "INPUT", "-p", "tcp", "-j", "MESHLOOM_INBOUND6"])
    assert _save6(client).count("-j MESHLOOM_INBOUND6") == 2
    install(InitSettings(), netns=client.netns)
    assert _save6(client) == once
    remove(netns=client.netns)
    assert "MESHLOOM" not in _save6(client) and "MESHLOOM" not in _save6(client, "legacy")


@pytest.mark.integration
def test_without_ip6tables_the_ipv4_rules_are_installed_and_the_result_says_ipv6_is_not_covered(
        two_pods: tuple[PodNet, PodNet], monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = two_pods
    monkeypatch.setattr(Backend, "has_ipv6", property(lambda self: False))
    result = install(InitSettings(), netns=client.netns)
    assert result.rules6 is None
    assert result.ipv6_gap.startswith("ip6tables-nft-restore is not installed: IPv6 inbound TCP is not refused")
    assert "MESHLOOM_OUTBOUND" in _save(client) and "MESHLOOM" not in _save6(client)


@pytest.mark.integration
def test_on_a_kernel_without_ipv6_the_ipv4_rules_are_installed_and_ip6tables_is_not_asked(
        two_pods: tuple[PodNet, PodNet], monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = two_pods
    monkeypatch.setattr("actions.iptables._kernel_has_ipv6", lambda: False)
    result = install(InitSettings(), netns=client.netns)
    assert result.rules6 is None and result.ipv6_gap.startswith("the kernel has no IPv6")
    assert "MESHLOOM_OUTBOUND" in _save(client) and "MESHLOOM" not in _save6(client)


@pytest.mark.integration
def test_a_pod_without_a_sidecar_reaches_a_service_address_at_each_of_its_endpoints(
        host_network: HostNetwork, listeners: Listeners) -> None:
    client, one, two = (host_network.add_pod(name) for name in ("client", "one", "two"))
    vip = str(host_network.subnet[-2])  # on the pods' link, as the single-host platform places Service addresses
    for pod in (one, two):
        listeners.start(pod, 8080)
    routes = [ServiceRoute(vip, 80, "tcp", ((str(one.ip), 8080), (str(two.ip), 8080)))]
    install_services(routes, netns=client.netns)
    once = _save(client)
    install_services(routes, netns=client.netns)
    assert _save(client) == once  # idempotent

    landed = {connect(client, vip, 80, uid=NOBODY).split()[0] for _ in range(24)}
    assert landed == {f"{one.ip}:8080", f"{two.ip}:8080"}  # both, at random: all 24 on one has odds of 2^-23

    install_services(routes[:0], netns=client.netns)  # the Service went: its address leads nowhere again
    assert "DNAT" not in _save(client) and "-A OUTPUT -j MESHLOOM_SERVICES" in _save(client)
    remove(netns=client.netns)
    assert "MESHLOOM" not in _save(client)
