"""Reading manifests for `meshctl apply`: multi-document YAML (or JSON) from a file or standard input."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from meshctl.problems import UsageProblem


def read(source: str) -> tuple[str, list[dict[str, Any]]]:
    """`source` is a path or "-"; returns how to name it and its non-empty documents (a `List` is unrolled)."""
    name, text = read_text(source)
    return name, parse(name, text)


def read_text(source: str) -> tuple[str, str]:
    """`source` is a path or "-": how to name it, and its text."""
    name = "<stdin>" if source == "-" else source
    try:
        return name, sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise UsageProblem(f"{name}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageProblem(f"{name}: not UTF-8 text") from None


def parse(name: str, text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML (or JSON) text named `name` in errors; a `List` is unrolled."""
    try:
        loaded = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageProblem(f"{name}:{where}: not valid YAML: {problem}") from None
    docs: list[dict[str, Any]] = []
    for i, doc in enumerate(loaded, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise UsageProblem(f"{name}: document {i}: a manifest must be a mapping, not {type(doc).__name__}")
        if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            docs.extend(item for item in doc["items"] if isinstance(item, dict))
        else:
            docs.append(doc)
    if not docs:
        raise UsageProblem(f"{name}: no manifests in it")
    return docs
