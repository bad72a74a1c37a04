"""Helpers shared by the meshctl tests: run the CLI in-process and read its one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from meshctl.cli import main

MESHCTL = str(Path(sys.executable).with_name("meshctl"))  # the installed console script, for out-of-process runs


def meshctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `meshctl *argv` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line a user's mistake prints, asserting there is exactly one and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line `meshctl *argv` prints when it refuses its arguments (exit code 2)."""
    code, _, err = meshctl(capsys, *argv)
    assert code == 2, err
    return one_line(err)
