"""`meshctl deploy` and `meshctl remove`: the control plane into a Kubernetes cluster, and out of it again.

Theory of operation: as `nginx-meshctl deploy/remove`, but the work is Helm's -- the chart in charts/meshloom,
installed as the release `meshloom` (into namespace `meshloom` by default) with the user's `--set` and `--values`,
which the chart's values.schema.json checks before anything reaches the cluster. Deploying again upgrades the
release in place (`helm upgrade --install`), so the same command converges an existing mesh to new settings.
`remove` uninstalls the release; the CRDs and the policies stored in them stay, as Helm never deletes CRDs (delete
them with kubectl when the mesh is gone for good).

Failures are one line: a missing helm or a malformed flag exits 2, values the schema rejects 7, no such release 3,
anything else helm refused 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import typer

from actions.helm import RELEASE, Helm, HelmError, HelmFailure, default_chart
from meshctl.errors import INVALID, NOT_FOUND, USAGE
from meshctl.problems import UsageProblem

_EXIT = {HelmFailure.MISSING: USAGE, HelmFailure.INVALID: INVALID, HelmFailure.NOT_FOUND: NOT_FOUND}


def _helm(kubeconfig: Path | None) -> Helm:
    if kubeconfig is not None and not kubeconfig.is_file():
        raise UsageProblem(f"--kubeconfig: {kubeconfig} does not exist")
    return Helm(kubeconfig=str(kubeconfig) if kubeconfig else None)


def _fail(exc: HelmError) -> typer.Exit:
    print(f"meshctl: {exc}", file=sys.stderr)
    return typer.Exit(_EXIT.get(exc.kind, 1))


def _check(set_values: Sequence[str], values_files: Sequence[Path], chart: Path) -> None:
    for item in set_values:
        key, eq, _ = item.partition("=")
        if not eq or not key.strip():
            raise UsageProblem(f"--set: {item!r} is not KEY=VALUE (e.g. --set mtls.mode=strict)")
    for path in values_files:
        if not path.is_file():
            raise UsageProblem(f"--values: {path} does not exist")
    if not (chart / "Chart.yaml").is_file():
        raise UsageProblem(f"--chart: {chart} is not a Helm chart (no Chart.yaml)")


def deploy(*, namespace: str, set_values: Sequence[str] = (), values_files: Sequence[Path] = (),
           kubeconfig: Path | None = None, chart: Path | None = None, release: str = RELEASE, wait: bool = False,
           dry_run: bool = False) -> None:
    """Installs or upgrades the mesh's release; with dry_run, prints the manifests instead."""
    chart = chart or default_chart()
    _check(set_values, values_files, chart)
    try:
        if dry_run:
            helm = Helm()
            typer.echo(helm.template(chart, release=release, namespace=namespace, values_files=values_files,
                                     set_values=set_values, include_crds=True), nl=False)
            return
        helm = _helm(kubeconfig)
        before = helm.status(release=release, namespace=namespace)
        helm.install(chart, release=release, namespace=namespace, values_files=values_files, set_values=set_values,
                     wait=wait)
    except HelmError as exc:
        raise _fail(exc) from None
    verb = "upgraded" if before is not None else "deployed"
    typer.echo(f"meshloom {verb} in namespace {namespace} (helm release {release})")


def remove(*, namespace: str, kubeconfig: Path | None = None, release: str = RELEASE) -> None:
    """Uninstalls the mesh's release; the CRDs and the policies in them are kept."""
    helm = _helm(kubeconfig)
    try:
        if helm.status(release=release, namespace=namespace) is None:
            raise HelmError(f"meshloom is not deployed in namespace {namespace} (no helm release {release!r})",
                            HelmFailure.NOT_FOUND)
        helm.uninstall(release=release, namespace=namespace)
    except HelmError as exc:
        raise _fail(exc) from None
    typer.echo(f"meshloom removed from namespace {namespace} (helm release {release}); its CRDs and policies are "
               "kept")
