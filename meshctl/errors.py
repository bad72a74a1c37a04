"""The one place where errors become exit codes."""

from __future__ import annotations

from actions.ca import CaConfigError
from catalog import ValidationError
from engine import EngineError, InvalidKey, UnknownEntity
from machines import BadPayload, IllegalKind, IllegalTrigger
from meshctl.local import HostProblem, MeshProblem
from meshctl.meshfile import ManifestProblems
from meshctl.problems import UsageProblem
from meshctl.resources import NoSuchResource
from store import Conflict, DatabaseError

USAGE = 2  # the command line itself is wrong
NOT_FOUND = 3  # the entity does not exist
REFUSED = 4  # the lifecycle refuses the trigger in the entity's state
DATABASE = 5  # the database cannot be used (unreachable, no schema, old schema)
BUSY = 6  # another writer or another control plane is in the way
INVALID = 7  # manifests rejected: nothing of them was stored
NOT_READY = 8  # `meshctl up -f`: a pod did not become ready (stuck or failed), or the control plane exited

_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UsageProblem, USAGE),
    (CaConfigError, USAGE),
    (ValidationError, INVALID),
    (ManifestProblems, INVALID),
    (HostProblem, REFUSED),
    (MeshProblem, NOT_READY),
    (NoSuchResource, NOT_FOUND),
    (IllegalKind, USAGE),
    (InvalidKey, USAGE),
    (BadPayload, USAGE),
    (UnknownEntity, NOT_FOUND),
    (IllegalTrigger, REFUSED),
    (DatabaseError, DATABASE),
    (Conflict, BUSY),
    (EngineError, BUSY),
)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code for an error meshctl knows how to explain in one line; None for a bug (traceback)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return None
