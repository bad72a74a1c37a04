"""Where the state lives: the state directory, the database URL, and opening the store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from machines import spec_for
from meshctl.problems import UsageProblem
from store import Store, redact, sqlite_url

LOCK_FILE = "control-plane.lock"  # in the state directory: held by the control plane running on it, with its pid


def default_state_dir() -> Path:
    env = os.environ.get("MESHLOOM_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshloom"


@dataclass(frozen=True, slots=True)
class Paths:
    state_dir: Path
    url: str

    @property
    def shown(self) -> str:
        return redact(self.url)

    def ensure_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


def resolve(state_dir: Path | None, db: str | None) -> Paths:
    directory = (state_dir or default_state_dir()).expanduser()
    return Paths(directory, db if db else sqlite_url(directory))


def open_store(paths: Paths) -> Store:
    return Store(paths.url)


def parse_ref(ref: str) -> tuple[str, str]:
    """`pod/default/web-1` -> ("pod", "default/web-1"); the kind must be one the engine knows."""
    kind, _, key = ref.partition("/")
    if not kind or not key:
        raise UsageProblem(f"'{ref}' is not KIND/KEY (e.g. pod/default/web-1)")
    spec_for(kind)  # raises IllegalKind with the known kinds
    return kind, key
