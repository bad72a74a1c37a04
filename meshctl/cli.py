"""meshctl: the one command line of Meshloom.

Errors are mapped to exit codes and one line on stderr in one place (`main`); a user's mistake never prints a
traceback.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from meshctl import output
from meshctl.context import open_store, parse_ref, resolve
from meshctl.errors import exit_code_for

app = typer.Typer(
    name="meshctl",
    help="Meshloom: a service mesh whose control plane is a journaled lifecycle engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The control plane's database.", no_args_is_help=True)
app.add_typer(db_app, name="db")

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


OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for scripts")]


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
def up(db: DbOpt = None, state_dir: StateDirOpt = None,
       tick: Annotated[float, typer.Option(help="seconds between scheduler ticks", min=0.05)] = 1.0,
       run_for: Annotated[float | None, typer.Option("--for", help="stop after this many seconds", min=0)] = None
       ) -> None:
    """Run the control plane on its embedded default: SQLite in the state directory, the engine and its scheduler.
    """
    from meshctl.up import run

    run(resolve(state_dir, db), tick_seconds=tick, run_for=run_for)


def main(argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="meshctl", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("meshctl: aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # a wrong flag or argument
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"meshctl: {_one_line(message)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except Exception as exc:
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"meshctl: {_one_line(str(exc))}", file=sys.stderr)
        return code


def _one_line(text: str) -> str:
    return " ".join(text.split())
