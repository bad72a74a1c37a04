"""`meshctl get` and `meshctl delete`: stored resources by kind, as a table, JSON or YAML."""

from __future__ import annotations

import json

import yaml

import catalog
from meshctl import output
from meshctl.problems import UsageProblem
from store import Store


class NoSuchResource(LookupError):
    pass


def kind_of(name: str) -> type[catalog.Resource]:
    cls = catalog.KINDS.get(name.lower())
    if cls is None:
        raise UsageProblem(f"unknown kind '{name}' (known: {', '.join(sorted(catalog.KINDS))})")
    return cls


def locate(kind: str, name: str, namespace: str | None) -> tuple[str, str, str]:
    """(kind, namespace, name) as stored: `NAMESPACE/NAME` or `--namespace`, else `default`; cluster-wide kinds
    have no namespace."""
    cls = kind_of(kind)
    ns, _, plain = name.rpartition("/")
    if cls.cluster_scoped:
        if ns or namespace:
            raise UsageProblem(f"{cls.kind} is cluster-wide: give its name without a namespace")
        return cls.kind.lower(), "", plain
    if ns and namespace and ns != namespace:
        raise UsageProblem(f"'{name}' and --namespace {namespace} name different namespaces")
    return cls.kind.lower(), ns or namespace or "default", plain


def get(store: Store, kind: str, name: str | None, namespace: str | None, fmt: str) -> None:
    cls = kind_of(kind)
    if name is not None:
        ref = locate(kind, name, namespace)
        found = store.resources_named([ref])
        if not found:
            raise NoSuchResource(f"{ref[0]}/{f'{ref[1]}/' if ref[1] else ''}{ref[2]}: no such resource")
    else:
        found = store.resources(cls.kind.lower(), namespace)
    manifests = [dict(r.body) for r in found]
    if fmt == "json":
        print(json.dumps(manifests[0] if name else {"kind": "List", "items": manifests}, indent=2, sort_keys=True))
    elif fmt == "yaml":
        print(yaml.safe_dump_all(manifests, sort_keys=False), end="")
    else:
        output.print_resources(cls.kind, [catalog.parse(m).summary() for m in manifests])
