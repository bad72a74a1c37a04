"""Tables for people (rich), JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

# Piped output is for grep and eyes alike: never cut a column to 80 characters there.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 400)


def duration(seconds: float | None) -> str:
    """12s, 5m3s, 2h10m, 3d4h; negative as "-5m" (already past)."""
    if seconds is None:
        return "-"
    sign, s = ("-", -seconds) if seconds < 0 else ("", seconds)
    s = int(s)
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{sign}{s // size}{unit}{f'{rest}{sub}' if rest else ''}"
    return f"{sign}{s}s"


def print_json(rows: Any) -> None:
    print(json.dumps(rows, indent=2, sort_keys=True, default=str))


def table(*columns: str) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, no_wrap=True)
    return t


def print_state(what: str, rows: list[Any]) -> None:
    if not rows:
        console.print(f"no {what}")
        return
    if what == "pods":
        t = table("POD", "STATE", "WAITING FOR", "NODE", "IP", "IN STATE")
        for r in rows:
            waiting = r.failure if r.failure else r.waiting_for
            t.add_row(r.pod, r.state, waiting or "-", r.node or "-", r.ip or "-", duration(r.seconds_in_state))
    elif what == "certs":
        t = table("CERT", "STATE", "SPIFFE ID", "SERIAL", "GEN", "NOT AFTER", "TIME LEFT")
        for r in rows:
            t.add_row(r.cert, r.state, r.spiffe_id, (r.serial or "-")[:16], r.generation or "-",
                      r.not_after or "-", duration(r.seconds_left))
    elif what == "sidecars":
        t = table("SIDECAR", "STATUS", "STATE", "DESIRED", "SENT", "ACKED", "IN STATE")
        for r in rows:
            t.add_row(r.sidecar, r.status, r.state, str(r.desired), str(r.sent), str(r.acked),
                      duration(r.seconds_in_state))
    else:
        t = table("GENERATION", "STATE", "NOT AFTER", "TIME LEFT")
        for r in rows:
            t.add_row(r.generation, r.state, r.not_after or "-", duration(r.seconds_left))
    console.print(t)


def print_audit(ref: str, rows: list[Any]) -> None:
    t = table("#", "AT", "FROM", "TO", "TRIGGER", "BY", "REASON")
    for r in rows:
        reason = f"{r.reason}: {r.reason_text}" + (f" ({r.detail})" if r.detail else "")
        t.add_row(str(r.version), r.at, r.from_state or "-", r.to_state, r.trigger, r.actor, reason)
    console.print(f"[bold]{ref}[/bold]")
    console.print(t)


def print_ca_status(rows: list[Any]) -> None:
    if not rows:
        console.print("no CA generation yet (start the control plane: meshctl up)")
        return
    t = table("GENERATION", "STATE", "ROLE", "SIGNS", "KEY", "SUBJECT", "NOT AFTER", "TIME LEFT", "LIVE LEAVES")
    for r in rows:
        t.add_row(r.generation, r.state, r.role, "yes" if r.active else "-", r.key_type, r.subject,
                  r.not_after or "-", duration(r.seconds_left), str(r.leaves))
    console.print(t)


def print_resources(kind: str, rows: list[dict[str, str]]) -> None:
    if not rows:
        console.print(f"no {kind} found")
        return
    t = table(*(c.upper().replace("_", " ") for c in rows[0]))
    for r in rows:
        t.add_row(*r.values())
    console.print(t)
