"""`meshctl top` over a store of pods and a fake of their proxies' metrics pages (the pages are real ones, see
tests/sidecar/test_traffic.py); the real proxies are read in tests/e2e/test_localmesh.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from actions import fake_actions
from actions.clock import SystemClock
from actions.metrics import FakeMetrics
from engine import Engine, UnknownEntity
from meshctl import top
from meshctl.problems import UsageProblem
from store import Store, migrate, sqlite_url
from tests.meshctl.support import meshctl, one_line

PAGES = Path(__file__).parents[1] / "sidecar" / "data"


def page(name: str) -> str:
    return (PAGES / f"metrics-{name}.txt").read_text()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """demo/frontend-0 and demo/client-0 ready, demo/gone-0 ready at an address where nothing answers, demo/new-0
    only admitted (the fake injects it at once)."""
    url = sqlite_url(tmp_path)
    migrate.upgrade(url)
    s = Store(url)
    clock = SystemClock()
    engine = Engine(s, fake_actions(clock), clock)
    engine.fire("ca", "1", "prepare", {"auto_activate": True})
    for name, ip in (("frontend-0", "10.9.0.4"), ("client-0", "10.9.0.2"), ("gone-0", "10.9.0.9")):
        engine.fire("pod", f"demo/{name}", "admit", {"service_account": name.split("-")[0]})
        engine.fire("pod", f"demo/{name}", "schedule", {"node": "local", "ip": ip})
        engine.fire("pod", f"demo/{name}", "sidecar_connected")
        engine.fire("sidecar", f"demo/{name}", "ack", {"generation": 1})
        engine.fire("pod", f"demo/{name}", "ready")
    engine.fire("pod", "demo/new-0", "admit", {"service_account": "new"})
    return s


class Ticks:
    """A monotonic clock that moves only when top sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_each_pod_is_read_twice_a_window_apart_and_one_that_does_not_answer_is_named_with_why(store) -> None:
    later = page("client").replace("} 510", "} 530")
    source = FakeMetrics({"10.9.0.4": [page("frontend")], "10.9.0.2": [page("client"), later]})
    ticks = Ticks()

    tops = {t.pod: t for t in top.collect(store, source, window=2.0, sleep=ticks.sleep, clock=ticks)}

    assert ticks.slept == [2.0]
    assert sorted(ip for ip, _, _ in source.scraped) == ["10.9.0.2", "10.9.0.2", "10.9.0.4", "10.9.0.4",
                                                         "10.9.0.9", "10.9.0.9"]
    assert {port for _, port, _ in source.scraped} == {15090}
    client = tops["demo/client-0"]
    assert client.traffic is not None and client.traffic.total(top.Direction.outbound) == 530
    assert client.rates == {("outbound", "demo/frontend:80"): 10.0}
    assert tops["demo/frontend-0"].rates == {("inbound", ":8080"): 0.0, ("outbound", "demo/backend:80 > backend-v1"):
                                             0.0, ("outbound", "demo/backend:80 > backend-v2"): 0.0}
    assert tops["demo/gone-0"].traffic is None
    assert tops["demo/gone-0"].problem == "its proxy's metrics at 10.9.0.9:15090: Connection refused"
    assert tops["demo/new-0"].problem == "it has no address yet (state injected)"


def test_without_a_window_each_pod_is_read_once_and_there_are_no_rates(store) -> None:
    source = FakeMetrics({"10.9.0.4": [page("frontend")]})
    ticks = Ticks()

    tops = top.collect(store, source, ref="pod/demo/frontend-0", window=0, sleep=ticks.sleep, clock=ticks)

    assert ticks.slept == [] and len(source.scraped) == 1
    assert [(t.pod, t.rates) for t in tops] == [("demo/frontend-0", None)]


def test_the_pods_table_sums_each_direction_and_the_pod_table_shows_every_edge(store, capsys) -> None:
    source = FakeMetrics({"10.9.0.4": [page("frontend")], "10.9.0.2": [page("client")]})
    ticks = Ticks()

    top.print_pods(top.collect(store, source, namespace="demo", window=1.0, sleep=ticks.sleep, clock=ticks),
                   window=1.0)
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["POD"][:3] == ["POD", "INBOUND", "IN"]
    assert rows["demo/frontend-0"] == ["demo/frontend-0", "490", "0.0", "100.0%", "40", "490", "0.0", "100.0%"]
    assert rows["demo/client-0"] == ["demo/client-0", "0", "0.0", "-", "0", "510", "0.0", "96.1%"]
    assert rows["demo/new-0"][-4:] == ["address", "yet", "(state", "injected)"]

    (frontend,) = top.collect(store, source, ref="pod/demo/frontend-0", window=0, sleep=ticks.sleep, clock=ticks)
    top.print_pod(frontend, window=0)
    out = capsys.readouterr().out
    assert "outbound   demo/backend:80 > backend-v1  http      384" in out
    assert "40 inbound request(s) or connection(s) refused by the mesh" in out


def test_json_has_every_edge_with_its_responses_and_rate(store) -> None:
    source = FakeMetrics({"10.9.0.2": [page("client"), page("client").replace("} 510", "} 520")]})
    ticks = Ticks()

    (client,) = top.as_json(top.collect(store, source, ref="pod/demo/client-0", window=5.0, sleep=ticks.sleep,
                                        clock=ticks))
    assert client["problem"] is None and client["refused"] == 0
    (edge,) = client["edges"]
    assert edge["peer"] == "demo/frontend:80" and edge["requests"] == 520 and edge["rps"] == 2.0
    assert edge["responses"] == {"2xx": 490, "5xx": 20}


def test_a_ref_that_is_not_a_pod_or_names_no_pod_is_refused(store) -> None:
    with pytest.raises(UsageProblem, match="pod/<namespace>/<name>"):
        top.collect(store, FakeMetrics({}), ref="cert/demo/frontend-0/1")
    with pytest.raises(UnknownEntity):
        top.collect(store, FakeMetrics({}), ref="pod/demo/nope-0")
    with pytest.raises(UsageProblem, match="not both"):
        top.collect(store, FakeMetrics({}), ref="pod/demo/frontend-0", namespace="demo")


def test_when_no_pod_answers_there_is_no_window_to_wait_out(store, capsys) -> None:
    ticks = Ticks()
    tops = top.collect(store, FakeMetrics({}), window=5.0, sleep=ticks.sleep, clock=ticks)
    assert ticks.slept == [] and all(t.traffic is None for t in tops)
    top.print_pods(top.collect(store, FakeMetrics({}), namespace="other", window=0), window=0, namespace="other")
    assert capsys.readouterr().out.strip() == "no pods in the mesh in namespace other"


def test_the_command_refuses_a_bad_ref_and_a_bad_window_in_one_line(capsys, tmp_path, store) -> None:
    code, _, err = meshctl(capsys, "top", "service/demo/web", "--state-dir", str(tmp_path), "--window", "0")
    assert code == 2 and "meshctl top shows a pod" in one_line(err)
    code, _, err = meshctl(capsys, "top", "pod/demo/nope-0", "--state-dir", str(tmp_path), "--window", "0")
    assert code == 3 and one_line(err).endswith("pod/demo/nope-0: no such entity")
    code, _, err = meshctl(capsys, "top", "--window", "-1", "--state-dir", str(tmp_path))
    assert code == 2
