"""The outside world, one module per system, each behind a small Protocol with a fake that behaves."""

from __future__ import annotations

from dataclasses import dataclass

from actions.ca import CertificateAuthority, FakeCertificateAuthority
from actions.clock import Clock
from actions.nats import ConfigPublisher, FakeConfigPublisher
from actions.nodeagent import FakeSvidDelivery, SvidDelivery
from actions.platform import FakePodPlatform, PodPlatform
from actions.vault import MemoryVault, SvidVault


@dataclass(frozen=True, slots=True)
class Actions:
    ca: CertificateAuthority
    delivery: SvidDelivery
    publisher: ConfigPublisher
    platform: PodPlatform
    vault: SvidVault


def fake_actions(clock: Clock) -> Actions:
    return Actions(FakeCertificateAuthority(clock), FakeSvidDelivery(), FakeConfigPublisher(), FakePodPlatform(),
                   MemoryVault())
