"""Reading the sidecars' metrics: an HTTP GET of the proxy's Prometheus exporter at a pod's address.

The metrics port (15090) is left out of the pod's redirect rules, so it answers plain HTTP at the pod's address to
anything that can route to it: the host of `meshctl up` through the bridge, a node of a cluster.
"""

from __future__ import annotations

import http.client
from typing import Protocol

from actions.errors import TemporaryError

TIMEOUT = 2.0  # seconds: a proxy answers in milliseconds; a pod that does not is shown as unreachable, not waited on
MAX_BYTES = 16 << 20  # a mesh of thousands of Services makes a page of megabytes; more is not a proxy's exporter


class ScrapeFailed(TemporaryError):
    """The proxy's metrics could not be read; `reason` says why in a few words."""


class MetricsSource(Protocol):
    def scrape(self, ip: str, port: int, path: str) -> str: ...


class HttpMetrics:
    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout

    def scrape(self, ip: str, port: int, path: str) -> str:
        conn = http.client.HTTPConnection(ip, port, timeout=self.timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read(MAX_BYTES + 1)
        except TimeoutError:
            raise ScrapeFailed(f"no answer in {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ScrapeFailed(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None
        finally:
            conn.close()
        if response.status != 200:
            raise ScrapeFailed(f"HTTP {response.status}")
        if len(body) > MAX_BYTES:
            raise ScrapeFailed(f"a page over {MAX_BYTES >> 20} MiB")
        return body.decode("utf-8", errors="replace")


class FakeMetrics:
    """Pages by address, served in turn (the last one again once they run out); an address without pages is
    refused, as a pod without a proxy would."""

    def __init__(self, pages: dict[str, list[str]]) -> None:
        self.pages = {ip: list(texts) for ip, texts in pages.items()}
        self.scraped: list[tuple[str, int, str]] = []

    def scrape(self, ip: str, port: int, path: str) -> str:
        self.scraped.append((ip, port, path))
        texts = self.pages.get(ip)
        if not texts:
            raise ScrapeFailed("Connection refused")
        return texts.pop(0) if len(texts) > 1 else texts[0]
