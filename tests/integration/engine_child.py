"""A real engine process for tests/integration/test_crash.py, which SIGKILLs it at the worst moments.

    engine_child.py URL SCENARIO --log FILE [--block-on-commit EFFECT | --block-after ACTION]

Scenarios (on the pod POD):
  admit     admit the pod: InjectSidecar, then `injected`
  schedule  admit, then schedule it: RequestIdentity creates its certificate, whose SignSvid signs it, and so on
  recover   `engine.recover()`: run what a killed process committed but never ran (or ran and never answered)

`--block-on-commit EFFECT` stops the process right after the commit that put EFFECT in the outbox, before it runs;
`--block-after ACTION` (inject | sign) stops it right after the action ran, before its outcome is committed. Either
prints a line starting with BLOCKED and then waits for the parent's SIGKILL; should the parent die instead, stdin
reaches EOF and the process exits at once without going on. Every action that runs appends a line to the log file,
so the parent can count runs across processes. On success the last stdout line is DONE followed by JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from actions import Actions, fake_actions
from actions.ca import FakeCertificateAuthority, Issued
from actions.clock import Clock, SystemClock
from actions.platform import FakePodPlatform
from engine import Engine
from store import Entity, PendingEffect
from tests.support.documents import DocumentedStore

POD = "shop/web"


def block(marker: str) -> NoReturn:
    print(f"BLOCKED {marker}", flush=True)
    sys.stdin.read()  # returns only at EOF: the parent is gone
    os._exit(3)


class Recorder:
    def __init__(self, log: Path, block_after: str | None) -> None:
        self.log, self.block_after = log, block_after

    def ran(self, action: str, detail: str) -> None:
        with self.log.open("a") as f:
            f.write(f"{action} {detail}\n")
        if self.block_after == action:
            block(f"after {action} {detail}")


class RecordingPlatform(FakePodPlatform):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def inject(self, pod: str) -> None:
        super().inject(pod)
        self.recorder.ran("inject", pod)


class RecordingCa(FakeCertificateAuthority):
    def __init__(self, clock: Clock, recorder: Recorder) -> None:
        super().__init__(clock)
        self.recorder = recorder

    def sign_svid(self, spiffe_id: str, dns_names: tuple[str, ...], ttl_seconds: float) -> Issued:
        issued = super().sign_svid(spiffe_id, dns_names, ttl_seconds)
        self.recorder.ran("sign", issued.serial)
        return issued


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("scenario", choices=["admit", "schedule", "recover"])
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--block-on-commit")
    parser.add_argument("--block-after", choices=["inject", "sign"])
    args = parser.parse_args()

    clock = SystemClock()
    recorder = Recorder(args.log, args.block_after)
    fakes = fake_actions(clock)
    ca = RecordingCa(clock, recorder)
    # The fake CA keeps its keys in memory, so each process makes its own (the real CA loads them from disk).
    ca.generate("1", timedelta(days=1).total_seconds())
    actions = Actions(ca=ca, delivery=fakes.delivery, publisher=fakes.publisher,
                      platform=RecordingPlatform(recorder), vault=fakes.vault)
    store = DocumentedStore(args.url)
    engine = Engine(store, actions, clock, actor=f"child-{args.scenario}")

    if args.block_on_commit:
        def on_commit(entity: Entity, pending: list[PendingEffect]) -> None:
            if any(p.effect == args.block_on_commit for p in pending):
                block(f"on commit of {entity.ref} v{entity.version} with {args.block_on_commit}")

        engine.on_commit = on_commit

    recovered = None
    if args.scenario in ("admit", "schedule"):
        engine.fire("pod", POD, "admit", {"service_account": "web", "labels": {"app": "web"}})
    if args.scenario == "schedule":
        engine.fire("pod", POD, "schedule", {"node": "node-1", "ip": "10.1.0.7"})
    if args.scenario == "recover":
        recovered = engine.recover()

    store.close()
    print("DONE " + json.dumps({"recovered": recovered, "stats": dataclasses.asdict(engine.stats)}), flush=True)


if __name__ == "__main__":
    main()
