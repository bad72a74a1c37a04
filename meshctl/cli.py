"""meshctl: the one command line of Meshloom.

Errors are mapped to exit codes and one line on stderr in one place (`main`); a user's mistake never prints a
traceback.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from meshctl import output
from meshctl.context import open_store, parse_ref, resolve
from meshctl.controller import controller_command
from meshctl.entry import run
from meshctl.errors import exit_code_for
from meshctl.init import init as init_command
from meshctl.sidecar import sidecar_command

app = typer.Typer(
    name="meshctl",
    help="Meshloom: a service mesh whose control plane is a journaled lifecycle engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The control plane's database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
ca_app = typer.Typer(help="The mesh CA: its generations, and rotating them.", no_args_is_help=True)
app.add_typer(ca_app, name="ca")

StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="State directory [default: $MESHLOOM_STATE_DIR, else ~/.local/state/meshloom]",
                 show_default=False),
]
DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="Database URL [default: SQLite in the state directory]", show_default=False),
]


class Format(enum.StrEnum):
    table = "table"
    json = "json"


class GetFormat(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for scripts")]
# The CA's settings, as `meshctl up` takes them (NGINX Service Mesh's defaults), and the scheduler's tick.
DEFAULT_TRUST_DOMAIN, DEFAULT_KEY_TYPE, DEFAULT_SVID_TTL, DEFAULT_CA_TTL = "example.org", "ec-p256", "1h", "720h"
DEFAULT_TICK = 1.0
TrustDomainOpt = Annotated[str, typer.Option("--trust-domain", help="SPIFFE trust domain of the mesh")]
KeyTypeOpt = Annotated[str, typer.Option("--key-type", help="ec-p256, ec-p384, rsa-2048 or rsa-4096")]
SvidTtlOpt = Annotated[str, typer.Option("--svid-ttl", help="lifetime of workload certificates (e.g. 1h, 30m)")]
CaTtlOpt = Annotated[str, typer.Option("--ca-ttl", help="lifetime of each CA generation (e.g. 720h)")]
UpstreamOpt = Annotated[Path | None, typer.Option(help="an upstream CA's certificate (PEM): the mesh signs with an "
                                                      "intermediate under it", show_default=False)]
UpstreamKeyOpt = Annotated[Path | None, typer.Option(help="the upstream CA's private key (PEM)", show_default=False)]
UpstreamBundleOpt = Annotated[Path | None, typer.Option(help="roots (PEM) the upstream certificate chains to",
                                                        show_default=False)]


class What(enum.StrEnum):
    pods = "pods"
    certs = "certs"
    sidecars = "sidecars"
    cas = "cas"


@app.command()
def version(db: DbOpt = None, state_dir: StateDirOpt = None) -> None:
    """Print meshctl's version and the database schema it needs (and has, with --db or --state-dir)."""
    from importlib.metadata import version as dist_version

    from store import migrate

    typer.echo(f"meshctl {dist_version('meshloom')}")
    typer.echo(f"schema needed: {migrate.head()}")
    if db is not None or state_dir is not None:
        paths = resolve(state_dir, db)
        typer.echo(f"schema in {paths.shown}: {migrate.current_at(paths.url) or '(none)'}")


@db_app.command("upgrade")
def db_upgrade(db: DbOpt = None, state_dir: StateDirOpt = None) -> None:
    """Create the database or bring it to this meshctl's schema (Alembic migrations)."""
    from store import migrate

    paths = resolve(state_dir, db)
    if db is None:
        paths.ensure_state_dir()  # the default database lives in it
    before, after = migrate.upgrade(paths.url)
    if before == after:
        typer.echo(f"{paths.shown}: already at schema {after}")
    else:
        typer.echo(f"{paths.shown}: schema {before or '(empty)'} -> {after}")


@app.command()
def state(what: Annotated[What, typer.Argument(help="pods, certs, sidecars or cas")],
          db: DbOpt = None, state_dir: StateDirOpt = None, out: OutputOpt = Format.table) -> None:
    """Where every pod, certificate, sidecar or CA generation is in its life."""
    from actions.clock import SystemClock
    from engine import views

    store = open_store(resolve(state_dir, db))
    now = SystemClock().now()
    rows: list[Any] = {
        What.pods: views.pods, What.certs: views.certs, What.sidecars: views.sidecars, What.cas: views.cas,
    }[what](store, now)
    if out is Format.json:
        output.print_json(views.as_dicts(rows))
    else:
        output.print_state(str(what), rows)


@app.command()
def audit(ref: Annotated[str, typer.Argument(help="KIND/KEY, e.g. pod/default/web-1 or cert/default/web-1/2")],
          db: DbOpt = None, state_dir: StateDirOpt = None, out: OutputOpt = Format.table) -> None:
    """The whole journal of one entity, oldest first, with the reason for every change."""
    from engine import UnknownEntity, views

    kind, key = parse_ref(ref)
    store = open_store(resolve(state_dir, db))
    rows = views.audit(store, kind, key)
    if not rows:
        raise UnknownEntity(kind, key)
    if out is Format.json:
        output.print_json(views.as_dicts(rows))
    else:
        output.print_audit(ref, rows)


@app.command()
def top(ref: Annotated[str | None, typer.Argument(help="one pod, pod/<namespace>/<name>: its traffic edge by edge",
                                                  show_default=False)] = None,
        namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="only this namespace",
                                                      show_default=False)] = None,
        window: Annotated[float, typer.Option(help="seconds between two readings, for requests per second (0: one "
                                                   "reading, totals only)", min=0, max=60)] = 1.0,
        db: DbOpt = None, state_dir: StateDirOpt = None, out: OutputOpt = Format.table) -> None:
    """Traffic through each pod's sidecar, from its proxy's own counters: requests in and out, requests per second,
    success rates, what the mesh refused; for one pod, per edge (each Service and split leg it calls, each port it
    serves) with 4xx, 5xx, errors and times. Reads the sidecars at their pod addresses: run it where they are
    routable (the host of 'meshctl up', a node)."""
    from actions.metrics import HttpMetrics
    from meshctl import top as view

    store = open_store(resolve(state_dir, db))
    tops = view.collect(store, HttpMetrics(), ref=ref, namespace=namespace, window=window)
    if out is Format.json:
        output.print_json(view.as_json(tops))
    elif ref is not None:
        view.print_pod(tops[0], window=window)
    else:
        view.print_pods(tops, window=window, namespace=namespace)


@app.command()
def fire(ref: Annotated[str, typer.Argument(help="KIND/KEY of the entity")],
         trigger: Annotated[str, typer.Argument(help="the trigger, e.g. reset, terminate, rotate, retry")],
         payload: Annotated[str, typer.Option(help="the trigger's payload as a JSON object")] = "{}",
         db: DbOpt = None, state_dir: StateDirOpt = None) -> None:
    """Fire a trigger by hand (an operator's action): journaled with you as the actor; its effects are left to the
    running control plane."""
    import getpass

    from actions.clock import SystemClock
    from engine import Engine, Policy

    kind, key = parse_ref(ref)
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc.msg}", param_hint="'--payload'") from None
    if not isinstance(data, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="'--payload'")
    store = open_store(resolve(state_dir, db))
    engine = Engine(store, None, SystemClock(), policy=Policy(effect_lease=0), actor=f"cli:{getpass.getuser()}")
    before = store.get(kind, key)
    after = engine.fire(kind, key, trigger, data, drain=False)
    if after is None or before is not None and after.version == before.version:
        typer.echo(f"{kind}/{key}: {trigger} changed nothing (its guard did not hold)")
    else:
        typer.echo(f"{kind}/{key}: {before.state if before else '-'} -> {after.state}")


@app.command()
def up(file: Annotated[str | None, typer.Option("--filename", "-f", help="a mesh manifest (kind Mesh: workloads "
                                                "and services; plus policy documents): run its pods on this host",
                                                show_default=False)] = None,
       db: DbOpt = None, state_dir: StateDirOpt = None,
       tick: Annotated[float, typer.Option(help="seconds between scheduler ticks", min=0.05)] = DEFAULT_TICK,
       run_for: Annotated[float | None, typer.Option("--for", help="stop after this many seconds", min=0)] = None,
       subnet: Annotated[str | None, typer.Option(help="with -f: the pods' bridge subnet, the lower half for pods, "
                                                      "the upper for Services [default: 10.213.0.0/16]",
                                                 show_default=False)] = None,
       prefix: Annotated[str | None, typer.Option(help="with -f: the name prefix of the bridge, namespaces and "
                                                      "veths [default: mesh-]", show_default=False)] = None,
       timeout: Annotated[float, typer.Option(help="with -f: seconds to wait for every pod to be ready", min=1)]
       = 300.0,
       trust_domain: TrustDomainOpt = DEFAULT_TRUST_DOMAIN, key_type: KeyTypeOpt = DEFAULT_KEY_TYPE,
       svid_ttl: SvidTtlOpt = DEFAULT_SVID_TTL, ca_ttl: CaTtlOpt = DEFAULT_CA_TTL, upstream_cert: UpstreamOpt = None,
       upstream_key: UpstreamKeyOpt = None, upstream_bundle: UpstreamBundleOpt = None) -> None:
    """Run the control plane on its embedded default: SQLite in the state directory, the engine and its scheduler,
    the mesh CA, the node agent (SPIFFE Workload API) and NATS with mutual TLS; in the foreground, with the pods of
    the mesh on this host if `up -f` ever made one here. With -f: run a mesh manifest's pods on this host as network
    namespaces, with the control plane in the background, and return once every pod is ready."""
    from actions.ca import CaSettings

    settings = CaSettings.from_flags(trust_domain=trust_domain, key_type=key_type, svid_ttl=svid_ttl, ca_ttl=ca_ttl,
                                     upstream_cert=upstream_cert, upstream_key=upstream_key,
                                     upstream_bundle=upstream_bundle)
    paths = resolve(state_dir, db)
    if file is None:
        from meshctl.up import run

        run(paths, settings, tick_seconds=tick, run_for=run_for)
        return
    from meshctl import local

    forwarded = _plane_args(trust_domain=trust_domain, key_type=key_type, svid_ttl=svid_ttl, ca_ttl=ca_ttl,
                            tick=tick, upstream=(upstream_cert, upstream_key, upstream_bundle), db=db)
    result = local.up(paths, file, subnet=subnet, prefix=prefix, timeout=timeout, plane_args=forwarded)
    how = "started the control plane" if result.started_control_plane else "the control plane was running"
    typer.echo(f"{result.pods} pod(s) ready in {result.seconds:.1f}s ({how}; its log: "
               f"{paths.state_dir / 'logs' / local.CONTROL_PLANE_LOG}). Inspect with 'meshctl state pods', "
               f"'meshctl audit pod/<namespace>/<name>'; stop with 'meshctl down'.")


def _plane_args(*, trust_domain: str = DEFAULT_TRUST_DOMAIN, key_type: str = DEFAULT_KEY_TYPE,
                svid_ttl: str = DEFAULT_SVID_TTL, ca_ttl: str = DEFAULT_CA_TTL, tick: float = DEFAULT_TICK,
                upstream: tuple[Path | None, Path | None, Path | None] = (None, None, None),
                db: str | None = None) -> list[str]:
    """The flags of the control plane `up -f` starts in the background, every setting spelled out, so that a later
    `up -f` can tell which of them a running one keeps."""
    args = ["--trust-domain", trust_domain, "--key-type", key_type, "--svid-ttl", svid_ttl, "--ca-ttl", ca_ttl,
            "--tick", f"{tick:g}"]
    for flag, value in zip(("--upstream-cert", "--upstream-key", "--upstream-bundle"), upstream, strict=True):
        if value is not None:
            args += [flag, str(value.absolute())]
    return args + (["--db", db] if db is not None else [])


@app.command()
def demo(state_dir: StateDirOpt = None,
         subnet: Annotated[str | None, typer.Option(help="the pods' bridge subnet [default: 10.213.0.0/16]",
                                                    show_default=False)] = None,
         prefix: Annotated[str | None, typer.Option(help="the name prefix of the bridge, namespaces and veths "
                                                         "[default: mesh-]", show_default=False)] = None,
         timeout: Annotated[float, typer.Option(help="seconds to wait for every pod to be ready", min=1)] = 300.0,
         trust_domain: TrustDomainOpt = DEFAULT_TRUST_DOMAIN) -> None:
    """A ready-made mesh on this host, exercised: client -> frontend -> backend split 80/20 between two versions,
    an intruder refused by the access policy, a rate-limited route. Sends traffic, prints requests per edge, success
    rates, the mutual-TLS identities, the split and the refusals; rotates the CA live under traffic; leaves the mesh
    up for 'meshctl state', 'meshctl audit', 'meshctl top' and 'meshctl ca status' ('meshctl down' stops it)."""
    from meshctl import local

    local.demo(resolve(state_dir, None), subnet=subnet, prefix=prefix, timeout=timeout,
               plane_args=_plane_args(trust_domain=trust_domain))


@app.command()
def down(purge: Annotated[bool, typer.Option("--purge", help="also remove the state directory")] = False,
         db: DbOpt = None, state_dir: StateDirOpt = None) -> None:
    """Stop the mesh on this host: every pod's life ended through its machine, the control plane stopped, every
    process, network namespace, veth, the bridge and the runtime directory removed."""
    from meshctl import local

    for line in local.down(resolve(state_dir, db), purge=purge):
        typer.echo(line)


@app.command()
def apply(file: Annotated[str, typer.Option("--filename", "-f", help="a YAML or JSON file of manifests, or - "
                                                                      "for standard input")],
          db: DbOpt = None, state_dir: StateDirOpt = None) -> None:
    """Create or update Services, Pods, Endpoints, MeshConfig and policies (TrafficSplit, TrafficTarget,
    HTTPRouteGroup, TCPRoute, RateLimit, CircuitBreaker). All documents are checked first; one bad document rejects
    them all, and what was stored before stays in force."""
    import getpass

    from actions.clock import SystemClock
    from engine import world
    from meshctl import manifests

    _, docs = manifests.read(file)
    store = open_store(resolve(state_dir, db))
    result = world.apply(store, docs, actor=f"cli:{getpass.getuser()}", now=SystemClock().now())
    for verb, names in (("created", result.created), ("configured", result.configured),
                        ("unchanged", result.unchanged)):
        for name in names:
            typer.echo(f"{name} {verb}")


class InjectFormat(enum.StrEnum):
    yaml = "yaml"
    json = "json"


@app.command()
def inject(file: Annotated[str, typer.Option("--filename", "-f", help="a YAML or JSON file of manifests, or - "
                                                                       "for standard input")],
           values: Annotated[Path | None, typer.Option("--values", help="chart values merged over "
                                                       "charts/meshloom/values.yaml, as helm -f", show_default=False)]
           = None,
           ignore_incoming_ports: Annotated[str, typer.Option(help="inbound ports the sidecar leaves alone, e.g. "
                                                                   "8081,9000 (besides 53)")] = "",
           ignore_outgoing_ports: Annotated[str, typer.Option(help="outbound ports the sidecar leaves alone, e.g. "
                                                                   "5432 (besides 53)")] = "",
           out: Annotated[InjectFormat, typer.Option("--output", "-o", help="yaml or json")] = InjectFormat.yaml,
           ) -> None:
    """Add the mesh's init container and sidecar to Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets,
    ReplicationControllers, Jobs and CronJobs (and Lists of them), as the admission webhook does; print the result.
    Other documents, and pods labelled injector.nsm.nginx.com/auto-inject=disabled, pass through unchanged, with the
    reason on stderr."""
    from meshctl.inject import run

    run(file, values, ignore_incoming_ports, ignore_outgoing_ports, str(out))


@app.command()
def get(kind: Annotated[str, typer.Argument(help="a kind by its lower-case name, e.g. service, trafficsplit")],
        name: Annotated[str | None, typer.Argument(help="NAME or NAMESPACE/NAME")] = None,
        namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="only this namespace")] = None,
        db: DbOpt = None, state_dir: StateDirOpt = None,
        out: Annotated[GetFormat, typer.Option("--output", "-o", help="table, json or yaml")] = GetFormat.table,
        ) -> None:
    """List stored resources of a kind, or show one."""
    from meshctl import resources

    store = open_store(resolve(state_dir, db))
    resources.get(store, kind, name, namespace, str(out))


@app.command()
def delete(kind: Annotated[str, typer.Argument(help="a kind by its lower-case name, e.g. trafficsplit")],
           name: Annotated[str, typer.Argument(help="NAME or NAMESPACE/NAME")],
           namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
           db: DbOpt = None, state_dir: StateDirOpt = None) -> None:
    """Delete one resource. Refused if a stored policy still refers to it."""
    import getpass

    from actions.clock import SystemClock
    from engine import world
    from meshctl import resources

    store = open_store(resolve(state_dir, db))
    kind_name, ns, plain = resources.locate(kind, name, namespace)
    try:
        world.delete(store, kind_name, ns, plain, actor=f"cli:{getpass.getuser()}", now=SystemClock().now())
    except LookupError as exc:
        raise resources.NoSuchResource(str(exc)) from None
    typer.echo(f"{kind_name}/{f'{ns}/' if ns else ''}{plain} deleted")


@ca_app.command("status")
def ca_status(db: DbOpt = None, state_dir: StateDirOpt = None, out: OutputOpt = Format.table) -> None:
    """Each CA generation: where it is in its life (preparing, prepared, active, retiring, retired), root or
    intermediate, subject and expiry."""
    from actions.clock import SystemClock
    from engine import views

    paths = resolve(state_dir, db)
    rows = views.ca_status(open_store(paths), paths.state_dir / "ca", SystemClock().now())
    if out is Format.json:
        output.print_json(views.as_dicts(rows))
    else:
        output.print_ca_status(rows)


@ca_app.command("rotate")
def ca_rotate(db: DbOpt = None, state_dir: StateDirOpt = None) -> None:
    """Start a CA rotation: a new generation is prepared and joins the trust bundle, then signs; every leaf is
    re-issued under it; the old generation leaves the bundle once none of its leaves is left. The running control
    plane carries it out; follow it with 'meshctl ca status' and 'meshctl audit ca/N'."""
    import getpass

    from actions.clock import SystemClock
    from engine import Engine, Policy, start_ca_rotation

    store = open_store(resolve(state_dir, db))
    engine = Engine(store, None, SystemClock(), policy=Policy(effect_lease=0), actor=f"cli:{getpass.getuser()}")
    new, old = start_ca_rotation(engine)
    typer.echo(f"ca/{new}: preparing; it replaces ca/{old}")


@app.command("node-agent")
def node_agent(socket_dir: Annotated[Path, typer.Option(help="where each workload's Workload API socket is made")],
               feed_dir: Annotated[Path, typer.Option(help="where the control plane delivers SVIDs and bundles")],
               run_for: Annotated[float | None, typer.Option("--for", help="stop after this many seconds",
                                                             min=0)] = None) -> None:
    """Run a node agent in its own process: a SPIFFE Workload API server with one socket per workload, fed from
    the directory the control plane delivers into."""
    from meshctl.agent import run

    run(socket_dir, feed_dir, run_for)


app.command("sidecar")(sidecar_command)

app.command("init")(init_command)

app.command("controller")(controller_command)


KubeconfigOpt = Annotated[Path | None, typer.Option("--kubeconfig", help="kubeconfig of the cluster [default: "
                                                    "$KUBECONFIG, else ~/.kube/config]", show_default=False)]
KubeNamespaceOpt = Annotated[str, typer.Option("--namespace", "-n", help="namespace of the control plane")]


@app.command()
def deploy(namespace: KubeNamespaceOpt = "meshloom",
           set_values: Annotated[list[str] | None, typer.Option("--set", help="a chart value, KEY=VALUE (e.g. "
                                                                "mtls.mode=strict); repeatable")] = None,
           values_files: Annotated[list[Path] | None, typer.Option("--values", "-f", help="a YAML file of chart "
                                                                   "values; repeatable")] = None,
           kubeconfig: KubeconfigOpt = None,
           chart: Annotated[Path | None, typer.Option(help="the chart [default: charts/meshloom]",
                                                      show_default=False)] = None,
           wait: Annotated[bool, typer.Option(help="wait until the control plane's pods are ready")] = False,
           dry_run: Annotated[bool, typer.Option(help="print the manifests instead of deploying")] = False) -> None:
    """Deploy the control plane into a Kubernetes cluster with Helm (charts/meshloom: controller, node agents,
    NATS, injector webhook, CRDs), or upgrade it in place when it is there already."""
    from meshctl.deploy import deploy as run

    run(namespace=namespace, set_values=set_values or [], values_files=values_files or [], kubeconfig=kubeconfig,
        chart=chart, wait=wait, dry_run=dry_run)


@app.command()
def remove(namespace: KubeNamespaceOpt = "meshloom", kubeconfig: KubeconfigOpt = None) -> None:
    """Remove the control plane from a Kubernetes cluster (helm uninstall). The CRDs and the policies in them are
    kept."""
    from meshctl.deploy import remove as run

    run(namespace=namespace, kubeconfig=kubeconfig)


def main(argv: list[str] | None = None) -> int:
    return run(app, argv, exit_code_for)
