"""`meshctl init` as a user (or an init container) meets it: --dry-run, one-line errors with their exit codes, and a
real install in a network namespace made by the `host_network` fixture."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from actions.iptables import Backend
from actions.netns import HostNetwork, run
from tests.meshctl.support import MESHCTL, meshctl, one_line

GOLDEN = Path(__file__).parents[1] / "actions" / "golden" / "iptables"


def test_dry_run_prints_the_ipv4_then_the_ipv6_rules_and_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = meshctl(capsys, "init", "--dry-run")
    assert (code, err) == (0, "")
    ipv4, separator, ipv6 = out.partition("# IPv6\n")
    assert ipv4 == (GOLDEN / "defaults.rules").read_text()
    assert separator and ipv6 == (GOLDEN / "defaults6.rules").read_text()


def test_ignored_ports_from_flags_come_in_addition_to_dns(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = meshctl(capsys, "init", "--dry-run", "--ignore-incoming-ports", "9100, 8443",
                           "--ignore-outgoing-ports", "5432", "--inbound-port", "16006", "--proxy-uid", "1337")
    assert code == 0
    for rule in ("-A MESHLOOM_INBOUND -p tcp --dport 53 -j RETURN",
                 "-A MESHLOOM_INBOUND -p tcp --dport 8443 -j RETURN",
                 "-A MESHLOOM_INBOUND -p tcp --dport 9100 -j RETURN",
                 "-A MESHLOOM_OUTBOUND -p tcp --dport 53 -j RETURN",
                 "-A MESHLOOM_OUTBOUND -p tcp --dport 5432 -j RETURN",
                 "-A MESHLOOM_INBOUND -p tcp -j REDIRECT --to-ports 16006",
                 "-A MESHLOOM_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
                 "-A MESHLOOM_INBOUND6 -p tcp --dport 8443 -j RETURN",
                 "-A MESHLOOM_INBOUND6 -p tcp --dport 9100 -j RETURN"):
        assert rule in out.splitlines()


def test_a_bad_port_list_is_one_line_naming_the_flag_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = meshctl(capsys, "init", "--dry-run", "--ignore-outgoing-ports", "5432,postgres")
    assert (code, out) == (2, "")
    assert one_line(err) == ("meshctl: --ignore-outgoing-ports: 'postgres' is not a port (1-65535) in "
                             "'5432,postgres'; expected a comma-separated list such as 80,443")


def test_equal_redirect_ports_or_a_port_out_of_range_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = meshctl(capsys, "init", "--dry-run", "--outbound-port", "15006")
    assert code == 2 and "must differ" in one_line(err)
    code, _, err = meshctl(capsys, "init", "--dry-run", "--inbound-port", "70000")
    assert code == 2 and "--inbound-port" in one_line(err)


def test_no_iptables_on_the_host_exits_5_with_one_line(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    code, _, err = meshctl(capsys, "init")
    assert code == 5 and "iptables is not installed" in one_line(err)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_an_unprivileged_caller_exits_4_with_one_line_and_changes_nothing() -> None:
    result = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--", MESHCTL,
                             "init"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 4, result.stderr
    assert "needs root or CAP_NET_ADMIN" in one_line(result.stderr)


@pytest.mark.integration
def test_init_installs_in_a_network_namespace_and_a_second_run_changes_nothing(
        host_network: HostNetwork, capsys: pytest.CaptureFixture[str]) -> None:
    pod = host_network.add_pod("web")
    args = ("init", "--netns", pod.netns, "--ignore-outgoing-ports", "5432")
    code, out, err = meshctl(capsys, *args)
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith(f"iptables-nft (no rules in network namespace {pod.netns} yet")
    saved = run(pod, ["iptables-nft-save", "-t", "nat"]).stdout
    assert "-A OUTPUT -p tcp -j MESHLOOM_OUTBOUND" in saved and "--dport 5432 -j RETURN" in saved
    assert out.splitlines()[-1].startswith("IPv6 inbound TCP refused except loopback, replies and ports 53,")
    saved6 = run(pod, ["ip6tables-nft-save", "-t", "filter"]).stdout
    assert "-A INPUT -p tcp -j MESHLOOM_INBOUND6" in saved6
    code, _, _ = meshctl(capsys, *args)
    assert code == 0
    again = run(pod, ["iptables-nft-save", "-t", "nat"]).stdout
    again6 = run(pod, ["ip6tables-nft-save", "-t", "filter"]).stdout

    def rules(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("#")]

    assert rules(again) == rules(saved) and rules(again6) == rules(saved6)


@pytest.mark.integration
def test_without_ip6tables_init_installs_ipv4_and_says_on_one_line_that_ipv6_is_not_covered(
        host_network: HostNetwork, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Backend, "has_ipv6", property(lambda self: False))
    pod = host_network.add_pod("web")
    code, out, err = meshctl(capsys, "init", "--netns", pod.netns)
    assert code == 0 and "rules installed" in out.splitlines()[0]
    assert one_line(err).startswith("meshctl: IPv6 not covered: ip6tables-nft-restore is not installed")


@pytest.mark.integration
def test_a_missing_network_namespace_exits_5_with_one_line(host_network: HostNetwork,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    missing = host_network.netns_name("nowhere")
    code, _, err = meshctl(capsys, "init", "--netns", missing)
    assert code == 5
    assert one_line(err) == f"meshctl: network namespace '{missing}' does not exist (ip netns list)"
