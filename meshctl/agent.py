"""`meshctl node-agent`: the SPIFFE Workload API server in its own process, fed from a directory."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

from rich.console import Console

from actions.nodeagent import NodeAgent, follow_directory

console = Console(highlight=False, stderr=True)


def run(socket_dir: Path, feed_dir: Path, run_for: float | None) -> None:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    feed_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with NodeAgent(socket_dir) as agent:
        console.print(f"node agent: sockets in {socket_dir}, fed from {feed_dir}")
        follower = threading.Thread(target=follow_directory, args=(agent, feed_dir, stop),
                                    kwargs={"open_sockets": True}, daemon=True)
        follower.start()
        stop.wait(run_for)
        stop.set()
        follower.join(timeout=5)
