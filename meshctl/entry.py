"""The `meshctl` entry point.

`meshctl sidecar` and `meshctl init` run in every pod, so what they import is paid once per pod: they are
dispatched here without loading the rest of the command line (the store and SQLAlchemy, the engine, the Kubernetes
client), which would add about 30 MB to every sidecar, nor nats-py's websocket transport (12 MB more). Everything
else goes to `meshctl.cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer

from meshctl.problems import UsageProblem

USAGE = 2


def run(app: typer.Typer, argv: list[str] | None, codes: Callable[[BaseException], int | None], *,
        prog_name: str = "meshctl") -> int:
    """Run a typer app with meshctl's error handling: a user's mistake is one line on stderr and an exit code."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("meshctl: aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # a wrong flag or argument
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"meshctl: {one_line(message)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except Exception as exc:
        code = codes(exc)
        if code is None:
            raise
        problems = getattr(exc, "problems", None)  # rejected manifests: every problem, a line each
        for line in [str(p) for p in problems] if problems else [str(exc)]:
            print(f"meshctl: {one_line(line)}", file=sys.stderr)
        return code


def one_line(text: str) -> str:
    return " ".join(text.split())


def _pod_codes(exc: BaseException) -> int | None:
    return USAGE if isinstance(exc, UsageProblem) else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "app":  # a pod's workload (apps/: the standard library only), nothing else loaded
        from apps.echo import main as app_main

        return app_main(args[1:])
    if args and args[0] in ("sidecar", "init"):
        pod = typer.Typer(add_completion=False)
        # nats-py loads aiohttp (about 12 MB) only for its websocket transport, which no pod uses (the sidecar
        # speaks NATS over TLS); it is installed for the Kubernetes client. Blocked, nats-py goes without it.
        sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]
        if args[0] == "sidecar":
            from meshctl.sidecar import sidecar_command as command
        else:
            from meshctl.init import init as command
        pod.command(args[0])(command)
        return run(pod, args[1:], _pod_codes, prog_name=f"meshctl {args[0]}")
    from meshctl.cli import main as full

    return full(args)
