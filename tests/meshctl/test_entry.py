"""The commands that run in every pod load only what they need: each import is paid once per pod."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("store", "engine", "sqlalchemy", "alembic", "kubernetes", "apscheduler", "meshctl.cli", "aiohttp")


@pytest.mark.parametrize(("command", "modules"), [("sidecar", "sidecar.agent, nats.aio.client"),
                                                  ("init", "actions.iptables")])
def test_a_pod_command_runs_without_the_store_the_engine_or_the_kubernetes_client(command: str, modules: str) -> None:
    probe = (
        "import sys\n"
        "from meshctl.entry import main\n"
        f"main([{command!r}, '--help'])\n"
        f"import {modules}\n"  # what the command imports once it runs
        "names = [m for m, module in sys.modules.items() if module is not None]\n"
        "loaded = {m.split('.')[0] for m in names} | set(names)\n"
        f"print(sorted(loaded & {set(HEAVY)!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_other_command_goes_to_the_whole_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from meshctl.entry import main

    assert main(["version"]) == 0
    assert "meshctl" in capsys.readouterr().out


def test_a_wrong_flag_of_a_pod_command_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    from meshctl.entry import main

    assert main(["init", "--inbound-port", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshctl:") and "\n" not in err
