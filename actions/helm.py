"""Helm, run as a subprocess: install, upgrade, uninstall, template and lint Meshloom's chart.

Theory of operation: the official helm binary does the work (charts, values.schema.json, three-way merges,
releases stored in the cluster); this module only finds it, builds its command lines and turns its failures into
one line. `find_helm` looks at $MESHLOOM_HELM, then the cache `scripts/kube` fills
($MESHLOOM_KUBE_CACHE or /var/cache/meshloom/kube, newest version first), then PATH. Each call runs helm once with
a bound on its time; helm's own "Error: ..." text becomes a `HelmError` whose `kind` says what went wrong, so the CLI
can pick an exit code without parsing messages again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from actions.errors import MissingTool, PermanentError

RELEASE = "meshloom"
NAMESPACE = "meshloom"
DEFAULT_CACHE = "/var/cache/meshloom/kube"


class HelmFailure(StrEnum):
    MISSING = "missing"  # no helm binary
    INVALID = "invalid"  # the values do not meet the chart's schema, or the chart does not render
    NOT_FOUND = "not-found"  # no such release
    UNREACHABLE = "unreachable"  # the cluster cannot be reached
    FAILED = "failed"  # anything else helm refused


class HelmError(PermanentError):
    """Helm failed; `str()` is one line naming the command and helm's reason."""

    def __init__(self, reason: str, kind: HelmFailure = HelmFailure.FAILED) -> None:
        super().__init__(" ".join(reason.split()))
        self.kind = kind


class HelmNotFound(HelmError, MissingTool):
    def __init__(self, reason: str) -> None:
        HelmError.__init__(self, reason, HelmFailure.MISSING)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in path.parent.name.split("."))


def find_helm() -> str:
    """The helm binary to run; HelmNotFound says how to get one."""
    explicit = os.environ.get("MESHLOOM_HELM")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise HelmNotFound(f"MESHLOOM_HELM={explicit} is not an executable file")
    cache = Path(os.environ.get("MESHLOOM_KUBE_CACHE", DEFAULT_CACHE))
    cached = sorted((p for p in cache.glob("*/helm") if os.access(p, os.X_OK)), key=_version_key, reverse=True)
    if cached:
        return str(cached[0])
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    raise HelmNotFound(f"helm is not installed: run scripts/kube (it caches helm in {cache}/<version>/), put helm "
                       "on PATH, or set MESHLOOM_HELM")


def default_chart() -> Path:
    """The chart in this source tree (charts/meshloom next to the packages)."""
    return Path(__file__).resolve().parent.parent / "charts" / "meshloom"


def _classify(text: str) -> HelmFailure:
    lowered = text.lower()
    if "values don't meet the specifications of the schema" in lowered or "parse error" in lowered \
            or "failed parsing --set" in lowered or "execution error" in lowered:
        return HelmFailure.INVALID
    if "release: not found" in lowered or "has no deployed releases" in lowered:
        return HelmFailure.NOT_FOUND
    if "kubernetes cluster unreachable" in lowered or "connection refused" in lowered:
        return HelmFailure.UNREACHABLE
    return HelmFailure.FAILED


def _reason(stderr: str) -> str:
    """Helm's error, from its first "Error:" line on (schema errors span several lines: joined with '; ')."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("Error:")), None)
    kept = lines[start:] if start is not None else lines[-3:]
    if kept and kept[0].startswith("Error:"):
        kept[0] = kept[0].removeprefix("Error:").strip()
    if kept and "values don't meet the specifications of the schema" in kept[0]:
        # The header and the chart names under it say nothing the items do not: keep the items.
        items = [line.lstrip("- ") for line in kept[1:] if not re.fullmatch(r"[\w.-]+:", line)]
        return "the chart's values.schema.json rejects the values: " + "; ".join(items)
    return "; ".join(line.lstrip("- ") for line in kept) or "no error message"


@dataclass(frozen=True, slots=True)
class Helm:
    """One helm binary and the cluster it talks to (kubeconfig None: helm's default, $KUBECONFIG or ~/.kube)."""

    binary: str = field(default_factory=find_helm)
    kubeconfig: str | None = None
    env: Mapping[str, str] | None = None  # extra environment (HELM_*_HOME, KUBECONFIG) over os.environ
    timeout: float = 300.0  # seconds for one helm command

    def run(self, verb: str, *args: str) -> str:
        """Runs `helm <verb> <args>`, returns its standard output; a failure is a HelmError."""
        command = [self.binary, verb, *args]
        if self.kubeconfig:
            command += ["--kubeconfig", self.kubeconfig]
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError:
            raise HelmNotFound(f"helm {verb}: {self.binary} does not exist") from None
        except subprocess.TimeoutExpired:
            raise HelmError(f"helm {verb}: no answer within {self.timeout:g} s", HelmFailure.UNREACHABLE) from None
        if done.returncode != 0:
            reason = _reason(done.stderr or done.stdout)
            raise HelmError(f"helm {verb}: {reason}", _classify(done.stderr + done.stdout))
        return done.stdout

    def install(self, chart: str | Path, *, release: str = RELEASE, namespace: str = NAMESPACE,
                values_files: Sequence[str | Path] = (), set_values: Sequence[str] = (),
                create_namespace: bool = True, upgrade: bool = True, wait: bool = False) -> str:
        """Installs the chart, or upgrades the release when it exists already (`upgrade --install`)."""
        args = [release, str(chart), "--namespace", namespace, *_values(values_files, set_values)]
        if create_namespace:
            args.append("--create-namespace")
        if wait:
            args += ["--wait", "--timeout", f"{int(self.timeout)}s"]
        if upgrade:
            return self.run("upgrade", "--install", *args)
        return self.run("install", *args)

    def upgrade(self, chart: str | Path, *, release: str = RELEASE, namespace: str = NAMESPACE,
                values_files: Sequence[str | Path] = (), set_values: Sequence[str] = (),
                reuse_values: bool = False) -> str:
        args = [release, str(chart), "--namespace", namespace, *_values(values_files, set_values)]
        if reuse_values:
            args.append("--reuse-values")
        return self.run("upgrade", *args)

    def uninstall(self, *, release: str = RELEASE, namespace: str = NAMESPACE) -> str:
        """Removes what the release installed; CRDs stay (Helm never deletes them, nor the policies they hold)."""
        return self.run("uninstall", release, "--namespace", namespace)

    def template(self, chart: str | Path, *, release: str = RELEASE, namespace: str = NAMESPACE,
                 values_files: Sequence[str | Path] = (), set_values: Sequence[str] = (),
                 include_crds: bool = False) -> str:
        """The manifests the chart renders, without a cluster."""
        args = [release, str(chart), "--namespace", namespace, *_values(values_files, set_values)]
        if include_crds:
            args.append("--include-crds")
        return self.run("template", *args)

    def lint(self, chart: str | Path, *, strict: bool = True, values_files: Sequence[str | Path] = (),
             set_values: Sequence[str] = ()) -> str:
        args = [str(chart), *_values(values_files, set_values)]
        if strict:
            args.append("--strict")
        return self.run("lint", *args)

    def status(self, *, release: str = RELEASE, namespace: str = NAMESPACE) -> str | None:
        """The release's status line ("deployed", "failed", ...), or None when there is no such release."""
        try:
            out = self.run("status", release, "--namespace", namespace, "--output", "json")
        except HelmError as exc:
            if exc.kind is HelmFailure.NOT_FOUND:
                return None
            raise
        info = json.loads(out).get("info", {})
        return str(info.get("status", "unknown"))


def _values(values_files: Sequence[str | Path], set_values: Sequence[str]) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["--values", str(path)]
    for item in set_values:
        args += ["--set", item]
    return args
