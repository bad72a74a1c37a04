"""For engine tests that are about rollouts, not about the catalog: every sidecar has a document."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from store import Document, Store


class DocumentedStore(Store):
    """A real store whose sidecars without a computed document get a small one, as if the world had their pod."""

    def document(self, sidecar: str) -> Document | None:
        found = super().document(sidecar)
        if found is not None:
            return found
        body = json.dumps({"sidecar": sidecar}, sort_keys=True)
        return Document(sidecar, "test", body, 0, datetime(2026, 1, 1, tzinfo=UTC))

    def documents(self, sidecars: Sequence[str]) -> dict[str, Document]:
        return {key: doc for key in sidecars if (doc := self.document(key)) is not None}
