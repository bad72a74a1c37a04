"""`meshctl init`: install the pod's traffic redirection (the init container's job, or a namespace's on one host).

On Kubernetes the injector turns the pod's annotations into these flags, so flags are all init reads. The rules and
their guarantees (atomic, idempotent, backend detection) are in actions/iptables.py. Errors are one line:
a bad flag exits 2; the host refusing (no privilege, iptables refusing the rules) exits 4; the host lacking what
init needs (no iptables, no such network namespace) exits 5. IPv6 inbound TCP is refused (the sidecar is IPv4 only)
when ip6tables is installed; when it is not, the IPv4 rules are still installed and one line on stderr says IPv6 is
not covered (exit 0).
"""

from __future__ import annotations

import enum
from typing import Annotated, NoReturn

import typer

from meshctl.problems import UsageProblem

REFUSED = 4  # as meshctl.errors: refused (here by the host: a privilege, or iptables itself)
UNUSABLE = 5  # as meshctl.errors: a facility cannot be used (here iptables or the namespace is missing)


class BackendChoice(enum.StrEnum):
    auto = "auto"
    nft = "nft"
    legacy = "legacy"


def init(
    inbound_port: Annotated[int, typer.Option(help="the sidecar's inbound port: inbound TCP is redirected here",
                                              min=1, max=65535)] = 15006,
    outbound_port: Annotated[int, typer.Option(help="the sidecar's outbound port: outbound TCP is redirected here",
                                               min=1, max=65535)] = 15001,
    proxy_uid: Annotated[int, typer.Option(help="the sidecar's uid, whose own traffic is never redirected",
                                           min=0)] = 2102,
    ignore_incoming_ports: Annotated[str, typer.Option(
        help="comma-separated ports whose inbound TCP is not redirected, in addition to 53 (annotation "
             "config.nsm.nginx.com/ignore-incoming-ports)")] = "",
    ignore_outgoing_ports: Annotated[str, typer.Option(
        help="comma-separated ports whose outbound TCP is not redirected, in addition to 53 (annotation "
             "config.nsm.nginx.com/ignore-outgoing-ports)")] = "",
    netns: Annotated[str | None, typer.Option(help="install in this named network namespace (ip netns) instead of "
                                                   "the current one", show_default=False)] = None,
    backend: Annotated[BackendChoice, typer.Option(help="iptables backend; auto uses the one that already holds "
                                                        "rules, else nft")] = BackendChoice.auto,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the iptables-restore input (then, under "
                                                            "'# IPv6', the ip6tables-restore input) and change "
                                                            "nothing")] = False,
) -> None:
    """Redirect the pod's TCP through its sidecar with iptables (nat table): inbound to the inbound port, outbound
    to the outbound port, except the sidecar's own traffic and ports, loopback, DNS and the ignored ports.
    IPv6 inbound TCP is refused (ip6tables filter table) except loopback, replies, admin/metrics and ignored ports.
    Atomic and idempotent: running it again leaves the same rules."""
    from actions.errors import MissingPrivilege, MissingTool
    from actions.iptables import (
        DNS_PORTS,
        InitConfigError,
        InitSettings,
        IptablesError,
        backend_named,
        install,
        parse_ports,
        render_rules,
        render_rules6,
    )

    try:
        incoming = parse_ports(ignore_incoming_ports, source="--ignore-incoming-ports")
        outgoing = parse_ports(ignore_outgoing_ports, source="--ignore-outgoing-ports")
        settings = InitSettings(inbound_port=inbound_port, outbound_port=outbound_port, proxy_uid=proxy_uid,
                                ignore_incoming_ports=(*DNS_PORTS, *incoming),
                                ignore_outgoing_ports=(*DNS_PORTS, *outgoing))
    except InitConfigError as exc:
        raise UsageProblem(_as_flag(str(exc))) from None
    if dry_run:
        typer.echo(render_rules(settings), nl=False)
        typer.echo("# IPv6")
        typer.echo(render_rules6(settings), nl=False)
        return
    try:
        chosen = None if backend is BackendChoice.auto else backend_named(str(backend))
        result = install(settings, netns=netns, backend=chosen)
    except MissingPrivilege as exc:
        _fail(str(exc), REFUSED)
    except MissingTool as exc:
        _fail(str(exc), UNUSABLE)
    except IptablesError as exc:
        _fail(str(exc), UNUSABLE if "does not exist" in str(exc) else REFUSED)
    where = f"network namespace {netns}" if netns else "this network namespace"
    typer.echo(f"iptables-{result.backend.name} ({result.backend.reason}): rules installed in {where}")
    typer.echo(f"inbound TCP -> {settings.inbound_port} except ports {_ports(settings.inbound_exempt)}")
    typer.echo(f"outbound TCP -> {settings.outbound_port} except uid {settings.proxy_uid}, loopback and ports "
               f"{_ports(settings.outbound_exempt)}")
    if result.rules6 is not None:
        typer.echo(f"IPv6 inbound TCP refused except loopback, replies and ports {_ports(settings.inbound6_allowed)}"
                   f"; outbound IPv6 not proxied")
    else:
        typer.echo(f"meshctl: IPv6 not covered: {result.ipv6_gap}", err=True)
    if result.cleaned_other_backend:
        other = "legacy" if result.backend.name == "nft" else "nft"
        typer.echo(f"removed Meshloom's chains left in iptables-{other} by an earlier run")


def _as_flag(message: str) -> str:
    """InitSettings names fields as flags without dashes ("inbound-port: ..."); the CLI says "--inbound-port"."""
    return message if message.startswith("--") else f"--{message}"


def _ports(ports: tuple[int, ...]) -> str:
    return ",".join(map(str, ports))


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"meshctl: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)
