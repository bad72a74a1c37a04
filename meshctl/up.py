"""`meshctl up`: the control plane on its embedded default, in the foreground until stopped.

It runs the engine and its scheduler on SQLite in the state directory, the mesh CA (keys in `ca/`), the node agent
(one Workload API socket per workload under `agent/`) and NATS with mutual TLS (`nats/`). On a state directory where
`meshctl up -f` made a mesh on this host (`local/network.json`), the local platform runs with it (engine/local.py):
the bridge first, NATS on its address, the pods adopted or started. Without one, the platform is the fake: pods come
from `meshctl apply` and whoever plays the platform.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from rich.console import Console

from actions import localstate
from actions.ca import CaSettings, format_duration
from actions.errors import ActionError
from engine import local
from engine.plane import ControlPlane, PlaneConfig
from meshctl import logs
from meshctl.context import LOCK_FILE, Paths
from meshctl.errors import BUSY, REFUSED
from store import Store, migrate

console = Console(highlight=False)


class AlreadyRunning(Exception):
    pass


def _lock(state_dir: Path) -> int:
    """One control plane per state directory: a second `up` is refused instead of racing the first."""
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode().strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"a control plane already runs on {state_dir} (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _summary(store: Store) -> str:
    counts = store.counts()
    if not counts:
        return "no entities yet"
    return "; ".join(f"{kind}: " + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
                     for kind, states in sorted(counts.items()))


def _log_transitions() -> None:
    """Every transition as a line on stderr, as the journal records it; the libraries' chatter stays quiet."""
    logs.setup(logs.PLAIN)


def run(paths: Paths, ca: CaSettings, *, tick_seconds: float, run_for: float | None) -> None:
    paths.ensure_state_dir()
    _log_transitions()
    try:
        lock = _lock(paths.state_dir)
    except AlreadyRunning as exc:
        console.print(f"meshctl: {exc}", style="red")
        raise SystemExit(BUSY) from None
    try:
        before, after = migrate.upgrade(paths.url)
        store = Store(paths.url)
        network = localstate.load_network(paths.state_dir)
        host: local.LocalHost | None = None
        if network is not None:
            bin_dir = Path(sys.executable).parent
            host = local.LocalHost(store, paths.state_dir, ca, network, meshctl=str(bin_dir / "meshctl"),
                                   bin_dir=bin_dir, tick_seconds=tick_seconds)
            plane = host.plane
        else:
            plane = ControlPlane(store, PlaneConfig(paths.state_dir, ca, tick_seconds=tick_seconds))
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        console.print(f"[bold]Meshloom control plane[/bold] (pid {os.getpid()})")
        console.print(f"  state dir  {paths.state_dir}")
        migrated = "" if before == after else f", from {before or 'empty'}"
        console.print(f"  database   {paths.shown} (schema {after}{migrated})")
        try:
            if host is not None:
                host.start()
            else:
                plane.start()
        except ActionError as exc:  # the host cannot run the mesh's pods: no privilege, a subnet taken, ...
            plane.stop()
            print(f"meshctl: {exc}", file=sys.stderr)  # one line, unwrapped: `up -f` shows it from the log
            raise SystemExit(REFUSED) from None
        try:
            active = plane.ca.active or "-"
            console.print(f"  CA         trust domain {ca.trust_domain}, {ca.key_type} keys, generation {active} "
                          f"signs; SVIDs live {format_duration(ca.svid_ttl)}")
            console.print(f"  node agent Workload API sockets under {plane.agent_dir}")
            if plane.nats is not None:
                console.print(f"  NATS       {plane.nats.url} (mutual TLS, pid {plane.nats.server.pid})")
            console.print(f"  engine     ticking every {tick_seconds:g}s; recovered {plane.recovered} pending "
                          f"effect(s)")
            if host is not None:
                console.print(f"  pods       on bridge {host.net.prefix}br, {host.net.subnet}; "
                              f"{len(host.platform.desired().pods)} in the mesh manifest")
            console.print(f"  entities   {_summary(store)}")
            console.print("Ready. Stop with Ctrl-C. Inspect with 'meshctl state pods|certs|sidecars|cas', "
                          "'meshctl ca status' and 'meshctl audit KIND/KEY'.")
            stop.wait(run_for)
        finally:
            plane.stop()
        console.print(f"Stopped. {plane.engine.stats.transitions} transition(s) this run; {_summary(store)}.")
        store.close()
    finally:
        os.close(lock)
