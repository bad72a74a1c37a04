"""State diagrams drawn from the transition tables themselves, so the picture cannot drift from the code.

Theory of operation
-------------------
`mermaid(spec)` walks the spec's states and rules in table order and writes a Mermaid `stateDiagram-v2`: one line per
(source, rule), labelled with the trigger and, where the rule has one, the name of its guard in brackets; `[*] -->`
into the state the creation trigger makes, and `--> [*]` out of every terminal state. Mermaid state ids may not hold
dashes, so a state is drawn under its enum member name and labelled with its value. Two rules that would draw the
same line are drawn once. The output depends only on the table, so the committed copies in docs/diagrams can be
compared byte for byte; `document(spec)` wraps it in the Markdown those files hold. No I/O here: the test writes them.
"""

from __future__ import annotations

import enum

from machines.base import Spec


def _guard_name(rule_guard: object) -> str:
    name = getattr(rule_guard, "__name__", "guard")
    return "guard" if name == "<lambda>" else name.strip("_")


def _label(trigger: str, guard: object | None) -> str:
    return f"{trigger} [{_guard_name(guard)}]" if guard is not None else trigger


def mermaid(spec: Spec) -> str:
    """The spec as a Mermaid state diagram, one line per transition, in table order."""
    lines = ["stateDiagram-v2"]
    for state in spec.states:
        lines.append(f'    state "{state.value}" as {state.name}')
    lines.append(f"    [*] --> {spec.initial.name} : {spec.create}")
    seen: set[str] = set()
    for rule in spec.rules:
        for source in rule.source:
            line = f"    {source.name} --> {rule.dest.name} : {_label(rule.trigger, rule.guard)}"
            if line not in seen:
                seen.add(line)
                lines.append(line)
    for state in spec.states:
        if state in spec.terminal:
            lines.append(f"    {state.name} --> [*]")
    return "\n".join(lines) + "\n"


def source_file(spec: Spec) -> str:
    """Where the table lives, as a path from the top of the source tree (e.g. machines/pod.py)."""
    states: type[enum.Enum] = spec.states
    return states.__module__.replace(".", "/") + ".py"


def document(spec: Spec) -> str:
    """The Markdown file that docs/diagrams/<kind>.md holds."""
    return (
        f"# The `{spec.kind}` lifecycle\n\n"
        f"Generated from `{source_file(spec)}` by `MESHLOOM_UPDATE_GOLDEN=1 pytest tests/machines/test_diagrams.py`;"
        " do not edit by hand.\n\n"
        f"```mermaid\n{mermaid(spec)}```\n"
    )
