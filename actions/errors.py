"""Errors an action raises; the engine translates them once into Retry or Fail outcomes."""

from __future__ import annotations


class ActionError(Exception):
    """Base of every action error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TemporaryError(ActionError):
    """Worth trying again (a server down, a timeout). `retry_after` overrides the engine's backoff."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class PermanentError(ActionError):
    """Trying again cannot help (a malformed request, a refused identity)."""


class HostUnsupported(PermanentError):
    """This host cannot do what was asked (network namespaces, iptables): one line saying what is missing."""


class MissingTool(HostUnsupported):
    """A system tool (ip, iptables-restore, setpriv) is not installed."""


class MissingPrivilege(HostUnsupported):
    """The process lacks a privilege (root, CAP_NET_ADMIN, CAP_SYS_ADMIN) the operation needs."""
