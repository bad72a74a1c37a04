"""Signed SVIDs between signing and delivery, and for delivering again after a restart.

A certificate is signed by one effect and delivered by the next; the key and chain wait here in between. `FileVault`
keeps them in the state directory (directories 0700, files 0600, written whole by rename), so that a control plane
that restarts can deliver every serving SVID to a fresh node agent without signing again. Only an owner's newest
material is kept once it has been delivered.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
from datetime import datetime
from pathlib import Path
from typing import Protocol

from actions.nodeagent import SvidMaterial, escape_owner


class SvidVault(Protocol):
    def put(self, owner: str, material: SvidMaterial) -> None: ...

    def get(self, owner: str, cert: str) -> SvidMaterial | None: ...

    def keep_only(self, owner: str, cert: str) -> None: ...

    def forget(self, owner: str) -> None: ...


class MemoryVault:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_owner: dict[str, dict[str, SvidMaterial]] = {}

    def put(self, owner: str, material: SvidMaterial) -> None:
        with self._lock:
            self._by_owner.setdefault(owner, {})[material.cert] = material

    def get(self, owner: str, cert: str) -> SvidMaterial | None:
        with self._lock:
            return self._by_owner.get(owner, {}).get(cert)

    def keep_only(self, owner: str, cert: str) -> None:
        with self._lock:
            held = self._by_owner.get(owner, {})
            for other in [c for c in held if c != cert]:
                del held[other]

    def forget(self, owner: str) -> None:
        with self._lock:
            self._by_owner.pop(owner, None)


class FileVault:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)

    def _dir(self, owner: str) -> Path:
        return self.directory / escape_owner(owner)

    def _file(self, owner: str, cert: str) -> Path:
        return self._dir(owner) / f"{escape_owner(cert)}.json"

    def put(self, owner: str, material: SvidMaterial) -> None:
        folder = self._dir(owner)
        folder.mkdir(mode=0o700, exist_ok=True)
        body = json.dumps({"cert": material.cert, "spiffe_id": material.spiffe_id,
                           "chain": [base64.b64encode(c).decode() for c in material.chain],
                           "key": base64.b64encode(material.key).decode(),
                           "not_after": material.not_after.isoformat()}).encode()
        path = self._file(owner, material.cert)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def get(self, owner: str, cert: str) -> SvidMaterial | None:
        try:
            raw = json.loads(self._file(owner, cert).read_bytes())
        except FileNotFoundError:
            return None
        return SvidMaterial(raw["cert"], raw["spiffe_id"], tuple(base64.b64decode(c) for c in raw["chain"]),
                            base64.b64decode(raw["key"]), datetime.fromisoformat(raw["not_after"]))

    def keep_only(self, owner: str, cert: str) -> None:
        keep = self._file(owner, cert).name
        folder = self._dir(owner)
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name != keep:
                    path.unlink(missing_ok=True)

    def forget(self, owner: str) -> None:
        shutil.rmtree(self._dir(owner), ignore_errors=True)
