"""Facts about the machine a benchmark ran on, recorded with its figures."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_state() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, check=True).stdout.strip())
        return {"commit": head, "uncommitted_changes": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {}


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def write_results(doc: dict[str, Any], path: Path, summary: str) -> None:
    """Write a benchmark's JSON and print its summary for people."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print()
    print(summary)
    print(f"written to {path}")


def machine(**extra: Any) -> dict[str, Any]:
    """The facts every benchmark records (when, on what, at which commit), plus its own (`extra`)."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **extra,
        "git": git_state(),
    }


Section = Callable[[argparse.Namespace], dict[str, Any]]


def section_main(argv: list[str] | None, *, name: str, doc: str, sections: Mapping[str, Section],
                 facts: Callable[[], dict[str, Any]], targets: dict[str, Any],
                 summary: Callable[[dict[str, Any]], str]) -> int:
    """The command line of a benchmark made of sections: `--quick`, `--out DIR`, `--section NAME` (repeatable; the
    results file keeps the other sections' last results), then the JSON written and the summary printed."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a short run; writes {name}-quick.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    parser.add_argument("--section", action="append", choices=list(sections),
                        help="run only this section (repeatable); the file keeps the others' last results")
    args = parser.parse_args(argv)
    path = args.out / (f"{name}-quick.json" if args.quick else f"{name}.json")
    results: dict[str, Any] = {}
    if args.section and path.exists():
        results = dict(json.loads(path.read_text()).get("sections", {}))
    for section in args.section or list(sections):
        results[section] = sections[section](args)
    out = {
        "benchmark": name,
        "mode": "quick" if args.quick else "full",
        "machine": facts(),
        "targets": targets,
        "method": doc.split("What is measured", 1)[1].strip().lstrip("-").strip(),
        "sections": {s: results[s] for s in sections if s in results},
    }
    write_results(out, path, summary(out))
    return 0
