"""`meshctl up -f` on a state directory whose control plane already runs: which of the asked flags it keeps."""

from __future__ import annotations

from meshctl.local import kept_flags

RUNNING = ["/venv/bin/meshctl", "up", "--state-dir", "/var/mesh", "--trust-domain", "example.org", "--tick", "0.5"]


def test_a_flag_the_running_control_plane_has_another_value_of_is_named_with_both_values() -> None:
    asked = ["--trust-domain", "corp.example", "--tick", "0.5", "--key-type", "ec-p384"]
    assert kept_flags(RUNNING, asked) == ["--trust-domain example.org (asked: corp.example)"]


def test_the_same_flags_or_an_unreadable_command_line_keep_nothing() -> None:
    assert kept_flags(RUNNING, ["--trust-domain", "example.org", "--tick", "0.5"]) == []
    assert kept_flags([], ["--tick", "1"]) == []
