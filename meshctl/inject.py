"""`meshctl inject`: manual sidecar injection of manifests, by the same code as the admission webhook.

Documents come from a file or standard input (multi-document YAML, or JSON); each Pod, Deployment, StatefulSet,
DaemonSet, ReplicaSet, ReplicationController, Job and CronJob (and each item of a List) is injected by
`catalog.inject.inject_document`, and everything comes out in the same order. A document that is not injected
(another kind, a pod labelled `injector.nsm.nginx.com/auto-inject=disabled`, a pod on the host network, ...) comes
out unchanged, with `<kind>/<name>: skipped: <reason>` on stderr. As nginx-meshctl does, the namespace's labels play
no part: what is given is injected, unless the pod itself says no.

The containers come from the chart's values: `charts/meshloom/values.yaml` beside this package (what `helm install`
uses), with `--values FILE` merged over it as `helm -f` merges (or alone, when the chart is not there).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from catalog.inject import InjectError, InjectionValues, InjectionValuesError, inject_document, parse_ports
from meshctl.problems import UsageProblem

CHART_VALUES = Path(__file__).resolve().parent.parent / "charts" / "meshloom" / "values.yaml"


def _read_text(source: str) -> tuple[str, str]:
    name = "<stdin>" if source == "-" else source
    try:
        return name, sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise UsageProblem(f"{name}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageProblem(f"{name}: not UTF-8 text") from None


def _yaml_problem(name: str, exc: yaml.YAMLError) -> UsageProblem:
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return UsageProblem(f"{name}:{where}: not valid YAML or JSON: {problem}")


def read_documents(source: str) -> tuple[str, list[Any]]:
    """The documents of a file or stdin, empty ones dropped; one clear line for text that is not YAML or JSON."""
    name, text = _read_text(source)
    try:
        loaded = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise _yaml_problem(name, exc) from None
    for i, doc in enumerate(loaded, start=1):
        if not isinstance(doc, dict):
            raise UsageProblem(f"{name}: document {i}: a manifest must be a mapping, not {type(doc).__name__}")
    if not loaded:
        raise UsageProblem(f"{name}: no manifests in it")
    return name, loaded


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, mappings merged key by key, anything else replaced: as `helm -f` merges values."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        out[key] = merge(below, value) if isinstance(below, Mapping) and isinstance(value, Mapping) else value
    return out


def _load_yaml_file(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageProblem(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageProblem(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise _yaml_problem(str(path), exc) from None


def load_values(values_file: Path | None, chart_values: Path = CHART_VALUES) -> InjectionValues:
    """The chart's values, with `values_file` merged over them; UsageProblem naming the file and the key."""
    values: Any = None
    shown = str(chart_values)
    if chart_values.exists():
        values = _load_yaml_file(chart_values, "the chart's values")
    elif values_file is None:
        raise UsageProblem(f"the chart's values are not at {chart_values}: pass --values FILE")
    if values_file is not None:
        extra = _load_yaml_file(values_file, "values")
        if extra is not None and not isinstance(extra, Mapping):
            raise UsageProblem(f"{values_file}: must be a mapping of chart values, not {type(extra).__name__}")
        values = merge(values if isinstance(values, Mapping) else {}, extra or {})
        shown = str(values_file) if not chart_values.exists() else f"{chart_values} + {values_file}"
    try:
        return InjectionValues.from_values(values, shown)
    except InjectionValuesError as exc:
        raise UsageProblem(str(exc)) from None


def _flag_ports(text: str, flag: str) -> tuple[int, ...]:
    try:
        return parse_ports(text, flag)
    except InjectError as exc:
        raise UsageProblem(f"{exc.field}: {exc.message}") from None


def render(docs: list[Any], fmt: str) -> str:
    if fmt == "json":
        out = docs[0] if len(docs) == 1 else {"apiVersion": "v1", "kind": "List", "items": docs}
        return json.dumps(out, indent=2) + "\n"
    # A wide line: a long argument (MESHLOOM_APP_PROBES's JSON) stays on one line, as a reader would look for it.
    return str(yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=4096))


def run(source: str, values_file: Path | None, ignore_incoming: str, ignore_outgoing: str, fmt: str) -> None:
    incoming = _flag_ports(ignore_incoming, "--ignore-incoming-ports")
    outgoing = _flag_ports(ignore_outgoing, "--ignore-outgoing-ports")
    values = load_values(values_file)
    _, docs = read_documents(source)
    out = []
    for doc in docs:
        result = inject_document(doc, values, ignore_incoming=incoming, ignore_outgoing=outgoing)
        out.append(result.document)
        for outcome in result.outcomes:
            if not outcome.decision.inject:
                print(f"{outcome.name}: skipped: {outcome.decision.text}", file=sys.stderr)
    sys.stdout.write(render(out, fmt))
