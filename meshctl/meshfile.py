"""Reading a mesh file for `meshctl up -f mesh.yaml`: the catalog's checks, each problem printed at its line.

The catalog says where a problem is as a document index and a field path (`spec.workloads[1].ports[0].containerPort`);
only the YAML text knows the line. So the text is parsed twice: once into plain values (by `meshctl.manifests`,
which also words syntax errors), once into YAML nodes, which keep their positions. A path that
leads to a field the file does not have (a missing required field) is placed at its nearest ancestor that exists.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import yaml

import catalog.meshfile as model
from catalog.meshfile import Located, MeshfileError, MeshSpec
from meshctl import manifests
from meshctl.problems import UsageProblem

# One step of a catalog path: `.name` (or a leading `name`), `[3]`, or `["a.b/c"]` for keys that are not identifiers.
_STEP = re.compile(r'\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\["((?:[^"\\]|\\.)*)"\]')


class ManifestProblems(Exception):
    """A mesh file refused before anything started; `problems` holds one `<file>:<line>: <path>: <message>` each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(self.problems[0] if self.problems else "invalid mesh file")


def load(source: str) -> tuple[str, list[dict[str, Any]], list[yaml.Node]]:
    """`source` is a path or "-": how to name it, its non-empty documents, and the YAML node of each of them."""
    name, text = manifests.read_text(source)
    docs = manifests.parse(name, text)
    nodes = [node for node in yaml.compose_all(text, Loader=yaml.SafeLoader) if not _empty(node)]
    if len(nodes) != len(docs):
        # manifests.read unrolls a `kind: List`; a mesh file is documents, so positions would no longer match.
        raise UsageProblem(f"{name}: a mesh file cannot hold a kind: List: write its items as documents")
    return name, docs, nodes


def _empty(node: yaml.Node | None) -> bool:
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null")


def locate(nodes: Sequence[yaml.Node], located: Located) -> int | None:
    """The 1-based line of the located field; its nearest existing ancestor's when the field is absent."""
    if not 0 <= located.document < len(nodes):
        return None
    node: yaml.Node = nodes[located.document]
    line: int = node.start_mark.line
    for key, index, quoted in _steps(located.path):
        if index is None:
            wanted = key if key is not None else (quoted or "").replace('\\"', '"').replace("\\\\", "\\")
            if not isinstance(node, yaml.MappingNode):
                break
            found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == wanted),
                         None)
            if found is None:
                break
            line, node = found[0].start_mark.line, found[1]
        else:
            if not isinstance(node, yaml.SequenceNode) or int(index) >= len(node.value):
                break
            node = node.value[int(index)]
            line = node.start_mark.line
    return line + 1


def _steps(path: str) -> list[tuple[str | None, str | None, str | None]]:
    """(key, index, quoted key) for each step of a path; exactly one of them is set."""
    return [(m.group(1), m.group(2), m.group(3)) for m in _STEP.finditer(path)]


def read(source: str) -> MeshSpec:
    """The mesh a file describes, checked as a whole; `ManifestProblems` lists every problem at its line."""
    name, docs, nodes = load(source)
    try:
        spec = model.read(docs)
        model.check(spec)
    except MeshfileError as exc:
        raise ManifestProblems([_line(name, nodes, p) for p in exc.problems]) from None
    return spec


def _line(name: str, nodes: Sequence[yaml.Node], problem: Located) -> str:
    line = locate(nodes, problem)
    where = f"{name}:{line}" if line is not None else f"{name}: document {problem.document + 1}"
    return f"{where}: {problem.path}: {problem.message}" if problem.path else f"{where}: {problem.message}"
