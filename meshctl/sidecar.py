"""`meshctl sidecar`: the sidecar agent beside one workload, in the foreground until SIGTERM or `POST /shutdown`.

Every flag falls back on the environment a pod gives its sidecar container: `SPIFFE_ENDPOINT_SOCKET` (the
Workload API, as SPIFFE names it), `POD_NAMESPACE` and `POD_NAME` (the downward API), `MESHLOOM_NATS_URL`, and
`MESHLOOM_APP_PROBES` (the app's HTTP probes the injector moved onto the admin port in strict mode). A flag or value
that cannot work is one line and exit code 2, before anything starts.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from catalog.inject import PROBES_ENV
from meshctl import logs
from meshctl.problems import UsageProblem

if TYPE_CHECKING:
    from sidecar.agent import AppProbe

DEFAULT_RUN_DIR = Path("/var/run/meshloom")
SIDECAR_UID = 2102  # sidecar.agent.SIDECAR_UID, named here so that `meshctl --help` need not import the agent


def _sidecar_key(value: str | None) -> str:
    if value:
        namespace, _, name = value.partition("/")
        if not namespace or not name or "/" in name:
            raise UsageProblem(f"--sidecar {value!r} is not NAMESPACE/NAME")
        return value
    namespace, name = os.environ.get("POD_NAMESPACE"), os.environ.get("POD_NAME")
    if namespace and name:
        return f"{namespace}/{name}"
    raise UsageProblem("--sidecar NAMESPACE/NAME is required (or POD_NAMESPACE and POD_NAME)")


def _socket(value: str | None) -> str:
    value = value or os.environ.get("SPIFFE_ENDPOINT_SOCKET")
    if not value:
        raise UsageProblem("--workload-socket unix:///PATH is required (or SPIFFE_ENDPOINT_SOCKET)")
    if not value.startswith("unix:///"):
        raise UsageProblem(f"--workload-socket {value!r} is not unix:///ABSOLUTE/PATH")
    return value


def _nats_url(value: str | None) -> str:
    value = value or os.environ.get("MESHLOOM_NATS_URL")
    if not value:
        raise UsageProblem("--nats-url tls://HOST:PORT is required (or MESHLOOM_NATS_URL)")
    scheme, _, rest = value.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tls" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageProblem(f"--nats-url {value!r} is not tls://HOST:PORT (the mesh's NATS needs mutual TLS)")
    return value


def _app_probes(value: str | None) -> dict[str, AppProbe]:
    """--app-probes, else $MESHLOOM_APP_PROBES; none when neither is given."""
    source, text = ("--app-probes", value) if value is not None else (PROBES_ENV, os.environ.get(PROBES_ENV))
    if not text:
        return {}
    from sidecar.agent import AppProbesError, parse_app_probes

    try:
        return parse_app_probes(text)
    except AppProbesError as exc:
        raise UsageProblem(f"{source}: {exc}") from None


def _owner(uid: int | None, gid: int | None) -> tuple[int | None, int | None]:
    """HAProxy's user: as asked; by default the sidecar's uid when the agent is root, else the agent's own."""
    root = os.geteuid() == 0
    if not root:
        for flag, asked, own in (("--uid", uid, os.geteuid()), ("--gid", gid, os.getegid())):
            if asked is not None and asked != own:
                raise UsageProblem(f"{flag} {asked} needs root (the agent runs as uid {os.geteuid()})")
        return None, None
    return (SIDECAR_UID if uid is None else uid), (SIDECAR_UID if gid is None else gid)


def sidecar_command(
    sidecar: Annotated[str | None, typer.Option("--sidecar", help="NAMESPACE/NAME of this sidecar's pod "
                                                "[default: $POD_NAMESPACE/$POD_NAME]", show_default=False)] = None,
    workload_socket: Annotated[str | None, typer.Option(help="the SPIFFE Workload API, unix:///PATH "
                                                        "[default: $SPIFFE_ENDPOINT_SOCKET]",
                                                        show_default=False)] = None,
    nats_url: Annotated[str | None, typer.Option(help="the control plane's NATS, tls://HOST:PORT "
                                                 "[default: $MESHLOOM_NATS_URL]", show_default=False)] = None,
    nats_server_name: Annotated[str, typer.Option(help="the name the NATS server's certificate carries")]
    = "localhost",
    run_dir: Annotated[Path, typer.Option(help="HAProxy's configuration, certificates and sockets")]
    = DEFAULT_RUN_DIR,
    uid: Annotated[int | None, typer.Option(help=f"HAProxy's user [default: {SIDECAR_UID} as root, else the "
                                            "agent's]", min=0, show_default=False)] = None,
    gid: Annotated[int | None, typer.Option(help=f"HAProxy's group [default: {SIDECAR_UID} as root, else the "
                                            "agent's]", min=0, show_default=False)] = None,
    admin_port: Annotated[int, typer.Option(help="readiness /ready, liveness /live, POST /shutdown, /status, "
                                            "/metrics", min=0, max=65535)] = 15021,
    admin_host: Annotated[str, typer.Option(help="address of the admin port")] = "0.0.0.0",
    inbound_port: Annotated[int, typer.Option(help="HAProxy's inbound port (iptables redirects here)",
                                              min=1, max=65535)] = 15006,
    outbound_port: Annotated[int, typer.Option(help="HAProxy's outbound port", min=1, max=65535)] = 15001,
    metrics_port: Annotated[int, typer.Option(help="HAProxy's Prometheus exporter", min=1, max=65535)] = 15090,
    drain_seconds: Annotated[float, typer.Option(help="on SIGTERM or POST /shutdown, how long connections in "
                                                 "flight may take to finish", min=0)] = 20.0,
    app_probes: Annotated[str | None, typer.Option(help="the app's HTTP probes answered on the admin port, as the "
                                                   "injector writes them in strict mTLS: JSON, "
                                                   "/app-health/<container>/<probe> -> {port, path, scheme, "
                                                   "httpHeaders} [default: $MESHLOOM_APP_PROBES]",
                                                   show_default=False)] = None,
) -> None:
    """Run the sidecar agent: its SVID from the Workload API, its configuration over NATS, HAProxy beside the
    workload; ready (GET /ready on the admin port) once all three are there. Drains on SIGTERM or POST /shutdown."""
    key, socket_url, url = _sidecar_key(sidecar), _socket(workload_socket), _nats_url(nats_url)
    probes = _app_probes(app_probes)
    owner, group = _owner(uid, gid)
    ports = [p for p in (admin_port, inbound_port, outbound_port, metrics_port) if p]
    if len(set(ports)) < len(ports):
        raise UsageProblem("--admin-port, --inbound-port, --outbound-port and --metrics-port must differ")

    from sidecar.agent import SidecarAgent, SidecarError, SidecarSettings
    from sidecar.haproxy import ProxyPorts

    settings = SidecarSettings(
        sidecar=key, workload_socket=socket_url, nats_url=url, run_dir=run_dir.absolute(),
        nats_server_name=nats_server_name,
        ports=ProxyPorts(inbound=inbound_port, outbound=outbound_port, metrics=metrics_port),
        admin_port=admin_port, admin_host=admin_host, uid=owner, gid=group, drain_seconds=drain_seconds,
        app_probes=probes)
    logs.setup()
    agent = SidecarAgent(settings)
    try:
        agent.start()
    except SidecarError as exc:
        agent.stop()
        raise UsageProblem(str(exc)) from exc

    def on_signal(signum: int, frame: FrameType | None) -> None:
        agent.request_stop()  # drains on a thread of its own; the main thread keeps waiting below

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not agent.wait(1.0):  # a bounded wait: the signal handler runs between two of them at the latest
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
