"""`meshctl up -f` on a state directory whose control plane already runs: which of the asked flags it keeps."""

from __future__ import annotations

from meshctl.local import kept_flags

RUNNING = ["/venv/bin/meshctl", "up", "--state-dir", "/var/mesh", "--trust-domain", "example.org", "--key-type",
           "ec-p256", "--tick", "0.5"]


def test_a_flag_the_running_control_plane_has_another_value_of_is_named_with_both_values() -> None:
    asked = ["--trust-domain", "corp.example", "--key-type", "ec-p256", "--tick", "0.5"]
    assert kept_flags(RUNNING, asked) == ["--trust-domain example.org (asked: corp.example)"]


def test_an_upstream_ca_asked_of_a_self_signed_plane_or_dropped_is_named_and_a_database_password_is_not() -> None:
    same = ["--trust-domain", "example.org", "--key-type", "ec-p256", "--tick", "0.5"]
    assert kept_flags(RUNNING, [*same, "--upstream-cert", "/ca.pem"]) == ["--upstream-cert (none) (asked: /ca.pem)"]
    assert kept_flags([*RUNNING, "--upstream-cert", "/ca.pem"], same) == ["--upstream-cert /ca.pem (asked: (none))"]
    db = kept_flags([*RUNNING, "--db", "postgresql://mesh:secret@db/mesh"], [*same, "--db", "sqlite:///x.db"])
    assert len(db) == 1 and "secret" not in db[0] and db[0].endswith("(asked: sqlite:///x.db)")


def test_the_same_flags_a_plane_started_by_hand_or_an_unreadable_command_line_keep_nothing() -> None:
    assert kept_flags(RUNNING, ["--trust-domain", "example.org", "--key-type", "ec-p256", "--tick", "0.5"]) == []
    assert kept_flags(["meshctl", "up", "--state-dir", "/var/mesh"], ["--tick", "0.25"]) == []  # its tick unknown
    assert kept_flags([], ["--tick", "1"]) == []
