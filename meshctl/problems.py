"""The user's mistakes every command can make, kept free of heavy imports: the commands that run in every pod
(`meshctl sidecar`, `meshctl init`) import this and not the store or the engine."""

from __future__ import annotations


class UsageProblem(Exception):
    """A user's mistake in what they asked for (exit code 2)."""
