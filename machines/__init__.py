"""Pure lifecycle tables: states, triggers, guards and effects as data. No I/O, no SQL, no clock."""

from machines.base import BadPayload, Context, Effect, IllegalTrigger, Rule, Spec, Step
from machines.certificate import CA_SPEC, CERT_SPEC
from machines.pod import SPEC as POD_SPEC
from machines.rollout import SPEC as ROLLOUT_SPEC

SPECS: dict[str, Spec] = {s.kind: s for s in (POD_SPEC, CERT_SPEC, CA_SPEC, ROLLOUT_SPEC)}


def spec_for(kind: str) -> Spec:
    try:
        return SPECS[kind]
    except KeyError:
        raise IllegalKind(kind) from None


class IllegalKind(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(f"unknown kind '{kind}' (known: {', '.join(sorted(SPECS))})")
        self.kind = kind


__all__ = ["BadPayload", "Context", "Effect", "IllegalKind", "IllegalTrigger", "Rule", "SPECS", "Spec", "Step",
           "spec_for"]
