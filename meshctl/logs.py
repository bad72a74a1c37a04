"""Logging for meshctl's long-running commands: one format, and the libraries' known noise left out."""

from __future__ import annotations

import logging
import sys

DETAILED = "%(asctime)s %(levelname)s %(name)s %(message)s"
PLAIN = "%(asctime)s %(levelname)s %(message)s"


class _SslEofNoise(logging.Filter):
    """asyncio warns on every TLS connection nats-py closes that its `eof_received` returned True, which is
    meaningless over TLS (the warning says so itself): a line per disconnection that tells an operator nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


def setup(fmt: str = DETAILED, meshloom_level: int = logging.INFO) -> None:
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    logging.getLogger("meshloom").setLevel(meshloom_level)
    noise = logging.getLogger("asyncio")
    if not any(isinstance(f, _SslEofNoise) for f in noise.filters):
        noise.addFilter(_SslEofNoise())
