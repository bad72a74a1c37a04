"""The chart's CRDs as the tests use them: each policy kind's schema, and a jsonschema validator that judges a
manifest as the API server's structural schema does (null fields pruned, int-or-string typed).

Which of the catalog's refusals a CRD schema cannot express, and why, is listed here once, for the test without a
cluster and the one against the real API server.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from actions.helm import default_chart

CRD_DIR = default_chart() / "crds"

# The catalog refuses these, a CRD schema cannot (the rule depends on the manifest's own namespace, on other
# fields' sums, on compiling a regular expression, or the field is unknown: the API server drops unknown fields
# silently rather than refusing them -- kubectl's client-side validation does refuse them).
SCHEMA_CANNOT = {
    "weights that add up to nothing": "a sum over the backends",
    "a misspelt top-level field": "unknown fields are pruned by the API server",
    "a backend in another namespace": "depends on the policy's own namespace",
    "a TrafficTarget for another namespace's account": "depends on the policy's own namespace",
    "a fallback in another namespace": "depends on the destination's namespace",
    "a path that is not a regular expression": "the schema cannot compile a regular expression",
}
# Refused by the API server itself, not by the CRD's schema: a name is required of every object, a list keyed by
# name refuses a duplicate key, a version the CRD does not serve does not exist.
SERVER_ONLY = {
    "a missing name": "metadata.name is the API server's",
    "two matches with one name": "x-kubernetes-list-type: map, checked by the API server",
}


@dataclass(frozen=True)
class Crd:
    path: Path
    manifest: dict[str, Any]

    @property
    def group(self) -> str:
        return str(self.manifest["spec"]["group"])

    @property
    def kind(self) -> str:
        return str(self.manifest["spec"]["names"]["kind"])

    @property
    def plural(self) -> str:
        return str(self.manifest["spec"]["names"]["plural"])

    @property
    def version(self) -> dict[str, Any]:
        versions = self.manifest["spec"]["versions"]
        assert len(versions) == 1, f"{self.path.name}: one version, the one the catalog reads"
        return dict(versions[0])

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version['name']}"

    @property
    def namespaced(self) -> bool:
        return bool(self.manifest["spec"]["scope"] == "Namespaced")

    @property
    def schema(self) -> dict[str, Any]:
        return dict(self.version["schema"]["openAPIV3Schema"])


def load_crds() -> list[Crd]:
    return [Crd(path, yaml.safe_load(path.read_text())) for path in sorted(CRD_DIR.glob("*.yaml"))]


def by_api_kind() -> dict[tuple[str, str], Crd]:
    return {(crd.api_version, crd.kind): crd for crd in load_crds()}


def _as_jsonschema(node: Any) -> Any:
    """OpenAPI v3 as the API server reads it, in jsonschema terms: int-or-string is integer or string."""
    if isinstance(node, dict):
        out = {k: _as_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-list")}
        if node.get("x-kubernetes-int-or-string"):
            out["type"] = ["integer", "string"]
        return out
    if isinstance(node, list):
        return [_as_jsonschema(v) for v in node]
    return node


def _prune_nulls(node: Any) -> Any:
    """The API server drops null fields that are not nullable (none of ours is) before validating."""
    if isinstance(node, dict):
        return {k: _prune_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_prune_nulls(v) for v in node]
    return node


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Why the chart's CRD schema refuses the manifest ([] when it accepts it); a kind or version no CRD serves is
    refused too."""
    crd = by_api_kind().get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if crd is None:
        return [f"no CRD serves {doc.get('apiVersion')} {doc.get('kind')}"]
    validator = jsonschema.Draft7Validator(_as_jsonschema(crd.schema))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_prune_nulls(doc))]


def schema_nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every node of a structural schema with its path, value validations (not, anyOf, ...) excluded."""
    yield path or "<root>", schema
    for name, child in schema.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], f"{path}{{}}")


def copy_into(doc: dict[str, Any], namespaces: dict[str, str]) -> dict[str, Any]:
    """The manifest with its namespaces (and those it refers to) renamed, for a shared API server."""
    out = copy.deepcopy(doc)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "namespace" and isinstance(value, str) and value in namespaces:
                    node[key] = namespaces[value]
                elif key == "service" and isinstance(value, str) and "/" in value:
                    ns, _, name = value.partition("/")
                    node[key] = f"{namespaces.get(ns, ns)}/{name}"
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    return out
