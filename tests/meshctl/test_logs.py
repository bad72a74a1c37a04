"""meshctl's long-running commands log in one format and leave out the libraries' known noise."""

from __future__ import annotations

import logging

import pytest

from meshctl import logs


def test_asyncios_tls_eof_warning_is_dropped_and_its_other_warnings_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    logs.setup()
    logs.setup()  # twice: still one filter
    noise = logging.getLogger("asyncio")
    assert sum(isinstance(f, logs._SslEofNoise) for f in noise.filters) == 1
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        noise.warning("returning true from eof_received() has no effect when using ssl")
        noise.warning("Executing <Task> took 0.2 seconds")
    assert [r.getMessage() for r in caplog.records] == ["Executing <Task> took 0.2 seconds"]
