"""The rendered HAProxy configuration: golden files (each also checked by `haproxy -c`), and which differences
become runtime API commands and which need a reload."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import catalog
from catalog.documents import Grant
from sidecar.haproxy import (
    ProxyConfig,
    ProxyPaths,
    RenderError,
    Server,
    parse_map,
    render,
    runtime_commands,
    slot_count,
)
from sidecar.proxy import check_config, find_haproxy, write_files
from tests.catalog.topology import manifests
from tests.sidecar.support import (
    breaker,
    bundle,
    document,
    endpoint,
    inbound_port,
    make_svid,
    rate_limit,
    route,
    run_dir,
    service,
    shard,
    shards_of,
    sid,
    split,
)
from tests.support.pki import Authority

GOLDEN = Path(__file__).resolve().parent / "golden" / "haproxy"
UPDATE = os.environ.get("MESHLOOM_UPDATE_GOLDEN") == "1"
RUN = "/run/meshloom/proxy"  # the run directory the golden files are rendered for

API, WEB, PAYMENTS, DB = sid("shop", "api"), sid("shop", "web"), sid("pay", "payments"), sid("shop", "db")
READ = route("read", ["GET", "HEAD"], "/api/.*")
WRITE = route("write", ["POST", "PUT"], "/api/.*", headers={"content-type": "^application/json"})
CANARY = route("canary", headers={"x-canary": "^true$"}, group="shop/canary-users")


def _api(port: int = 8080, endpoints: tuple[str, ...] = ("10.0.2.1", "10.0.2.2")) -> Any:
    return service("api", "10.96.0.11", [("http-api", port, "http", [endpoint(ip, 8000, API) for ip in endpoints])])


def _topology(key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    world = catalog.World(catalog.parse_all(manifests()))
    out = catalog.render(world, "example.org")
    return json.loads(out.sidecars[key]), [json.loads(v) for v in out.shared.values()]


def _cases() -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    db_shard = shard("shop", service("db", "10.96.0.14", [("tcp-pg", 5432, "tcp", [endpoint("10.0.3.1", 5432, DB)])]))
    split_shard = shard("shop", service(
        "api", "10.96.0.11", [("http-api", 8080, "http", [endpoint("10.0.2.1", 8000, API)]),
                              ("grpc", 9090, "grpc", [endpoint("10.0.2.1", 9090, API)])],
        split=split("shop/api-canary", [("api-v1", 90, {8080: [endpoint("10.0.2.1", 8000, API)],
                                                        9090: [endpoint("10.0.2.1", 9090, API)]}),
                                        ("api-v2", 10, {8080: [endpoint("10.0.2.2", 8001, API)]})], [CANARY])))
    breaker_shard = shard("shop", service(
        "web", "10.96.0.10", [("http", 80, "http", [endpoint("10.0.1.1", 8080, WEB), endpoint("10.0.1.2", 8080, WEB)])],
        breaker=breaker(3, 30, ("shop/fallback", 80, [endpoint("10.0.4.1", 8080, sid("shop", "default"))]))))
    plain_shard = shard("legacy", service("old", "10.96.2.10", [("", 80, "http", [endpoint("10.0.6.1", 80)])]))
    return {
        "strict-deny-routes": (document(
            inbound=[inbound_port(8000, sources=[Grant(PAYMENTS, (READ, WRITE)), Grant(WEB, (READ,)),
                                                 Grant(sid("shop", "ops"), None)]),
                     inbound_port(9090, "grpc", sources=[Grant(WEB, (READ,))])],
            shards=[shard("shop", _api())], mtls="strict", access="deny", lb="least_conn"), [shard("shop", _api())]),
        "permissive-allow": (document(inbound=[inbound_port(8080, allow_all=True)], shards=[shard("shop", _api())],
                                      mtls="permissive", access="allow"), [shard("shop", _api())]),
        "permissive-deny": (document(inbound=[inbound_port(8080, sources=[Grant(WEB, (READ,))])],
                                     mtls="permissive", access="deny", body="64k"), []),
        "off": (document(inbound=[inbound_port(8080, allow_all=True), inbound_port(5432, "tcp", allow_all=True)],
                         shards=[shard("shop", _api()), plain_shard], mtls="off", access="allow",
                         log_format="json"), [shard("shop", _api()), plain_shard]),
        "split-matches": (document(shards=[split_shard], access="allow"), [split_shard]),
        "rate-limit": (document(
            inbound=[inbound_port(8000, allow_all=True, rate_limits=[
                rate_limit("api-default", "600r/m", burst=10, delay=5),
                rate_limit("api-writes", "10r/s", burst=5, sources=[WEB, PAYMENTS], routes=[WRITE])])],
            access="allow", body="64k"), []),
        "circuit-breaker": (document(shards=[breaker_shard], access="allow", lb="random_two_least_conn"),
                            [breaker_shard]),
        "tcp-port": (document(inbound=[inbound_port(5432, "tcp", sources=[Grant(API, None)])], shards=[db_shard],
                              mtls="strict", access="deny"), [db_shard]),
        "topology-shop.api-v1-1": _topology("shop/api-v1-1"),
        "topology-shop.db-0": _topology("shop/db-0"),
    }


CASES = _cases()


def _golden_text(config: ProxyConfig) -> str:
    maps = "".join(f"\n# --- {name} ---\n" + "".join(f"# {line}\n" for line in content.splitlines())
                   for name, content in sorted(config.files.items()))
    return config.text + maps


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_rendered_configuration_is_the_committed_golden_file(name: str) -> None:
    doc, shards = CASES[name]
    config = render(doc, shards_of(*shards), ProxyPaths(RUN))
    path = GOLDEN / f"{name}.cfg"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_golden_text(config))
    assert path.exists(), f"no golden file {path}: run with MESHLOOM_UPDATE_GOLDEN=1"
    assert _golden_text(config) == path.read_text()


def test_no_golden_file_is_left_without_its_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*.cfg")} == set(CASES)


@pytest.fixture(scope="module")
def svid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = Authority.root()
    svid = make_svid(root, sid("shop", "app"), tmp_path_factory.mktemp("certs"))
    return {"svid.pem": svid.pem, "bundle.pem": bundle(root)}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(CASES))
def test_haproxy_accepts_the_rendered_configuration(name: str, svid_files: dict[str, bytes]) -> None:
    doc, shards = CASES[name]
    with run_dir() as directory:
        config = render(doc, shards_of(*shards), ProxyPaths(directory))
        check_config(find_haproxy(), str(write_files(ProxyPaths(directory), config, svid_files)))


# --------------------------------------------------------------------------------------------------- content ---
def _render(doc: dict[str, Any], *shards: dict[str, Any]) -> ProxyConfig:
    return render(doc, shards_of(*shards), ProxyPaths(RUN))


def test_a_service_port_is_routed_by_its_address_to_a_backend_named_after_it() -> None:
    config = _render(document(shards=[shard("shop", _api())]), shard("shop", _api()))
    assert parse_map(config.files["outbound.map"]) == {"10.96.0.11:8080": "http:shop.api:8080"}
    assert parse_map(config.files["pods.map"]) == {"10.0.2.1:8000": "api.shop.sa", "10.0.2.2:8000": "api.shop.sa"}
    servers = [line for line in config.text.splitlines() if line.strip().startswith("server api.shop-")]
    assert len(servers) == slot_count(2) == 4
    assert all("ssl crt" in line and "verify required" in line and "verifyhost api.shop.sa" in line
               for line in servers)


def test_endpoints_without_a_sidecar_and_mtls_off_get_plain_connections() -> None:
    legacy = shard("legacy", service("old", "10.96.2.10", [("", 80, "http", [endpoint("10.0.6.1", 80)])]))
    config = _render(document(shards=[legacy]), legacy)
    assert "server plain-1" in config.text or "server plain-2" in config.text
    assert " ssl " not in "".join(line for line in config.text.splitlines() if "server plain-" in line)
    off = _render(document(shards=[shard("shop", _api())], mtls="off"), shard("shop", _api()))
    assert "verifyhost" not in off.text and "pods.map" not in off.files and "outbound-pod" not in off.text


def test_udp_ports_are_left_out() -> None:
    udp = shard("shop", service("dns", "10.96.0.53", [("dns", 53, "udp", [endpoint("10.0.7.1", 53)])]))
    config = _render(document(inbound=[inbound_port(53, "udp", transport="UDP")], shards=[udp]), udp)
    assert "10.96.0.53" not in config.files["outbound.map"] and "inbound:53" not in config.text


def test_a_shard_the_document_names_but_nobody_gave_is_an_error_naming_it() -> None:
    with pytest.raises(RenderError, match="outbound shard 'shop'"):
        render(document(shards=[shard("shop", _api())]), {}, ProxyPaths(RUN))


def test_an_endpoint_identity_that_is_not_a_workload_spiffe_id_is_an_error_naming_it() -> None:
    bad = shard("shop", service("api", "10.96.0.11", [("http", 80, "http", [endpoint("10.0.2.1", 80, "x")])]))
    with pytest.raises(RenderError, match="'x' is not a workload SPIFFE ID"):
        _render(document(shards=[bad]), bad)


def test_a_regular_expression_with_quotes_and_spaces_stays_one_word() -> None:
    odd = route("odd", path="/a b/it's")
    config = _render(document(inbound=[inbound_port(8000, sources=[Grant(WEB, (odd,))])]))
    assert "{ path_reg '^(?:/a b/it'\\''s)' }" in config.text


def test_the_placement_of_endpoints_does_not_depend_on_their_order() -> None:
    a = _render(document(shards=[shard("shop", _api(endpoints=("10.0.2.1", "10.0.2.2")))]),
                shard("shop", _api(endpoints=("10.0.2.1", "10.0.2.2"))))
    b = _render(document(shards=[shard("shop", _api(endpoints=("10.0.2.2", "10.0.2.1")))]),
                shard("shop", _api(endpoints=("10.0.2.2", "10.0.2.1"))))
    assert a.text == b.text


def test_slot_counts_leave_room_for_one_more_endpoint() -> None:
    assert [slot_count(n) for n in (0, 1, 2, 3, 4, 7, 8, 100)] == [2, 2, 4, 4, 8, 8, 16, 128]


# -------------------------------------------------------------------------------------------- runtime or not ---
def _two(before: dict[str, Any], after: dict[str, Any], shards_before: list[dict[str, Any]] | None = None,
         shards_after: list[dict[str, Any]] | None = None) -> tuple[ProxyConfig, ProxyConfig]:
    return (render(before, shards_of(*(shards_before or [])), ProxyPaths(RUN)),
            render(after, shards_of(*(shards_after or [])), ProxyPaths(RUN)))


def test_an_endpoint_change_is_a_few_runtime_commands() -> None:
    s1, s2 = shard("shop", _api(endpoints=("10.0.2.1", "10.0.2.2"))), shard("shop", _api(endpoints=("10.0.2.1",
                                                                                                    "10.0.2.3")))
    old, new = _two(document(shards=[s1]), document(shards=[s2]), [s1], [s2])
    commands = runtime_commands(old, new)
    assert commands is not None
    backend = [c for c in commands if c.startswith("set server")]
    assert any("addr 10.0.2.3 port 8000" in c for c in backend)
    assert any(c.endswith("state maint") for c in backend) or any(" addr 10.0.2.3 " in c for c in backend)
    assert f"del map {RUN}/pods.map 10.0.2.2:8000" in commands
    assert f"add map {RUN}/pods.map 10.0.2.3:8000 api.shop.sa" in commands
    # the endpoint that stayed keeps its slot
    kept = [k for k, v in old.servers.items() if (v.address, v.port) == ("10.0.2.1", 8000)]
    assert kept and all(new.servers[k] == old.servers[k] for k in kept)


def _run(servers: dict[str, Server], commands: list[str]) -> dict[str, tuple[str, int, bool]]:
    """What HAProxy's slots look like after `commands` (server commands only)."""
    state = {k: (v.address, v.port, v.enabled) for k, v in servers.items()}
    for c in commands:
        words = c.split()
        if words[:2] != ["set", "server"]:
            continue
        address, port, enabled = state[words[2]]
        if words[3] == "state":
            enabled = words[4] == "ready"
        else:
            address, port = words[4], int(words[6])
        state[words[2]] = (address, port, enabled)
    return state


@pytest.mark.parametrize("before,after", [
    (("10.0.2.1", "10.0.2.2"), ("10.0.2.1",)),  # the group shrinks below its slots: extra slots are parked
    (("10.0.2.1", "10.0.2.2", "10.0.2.3"), ("10.0.2.3", "10.0.2.1")),
    (("10.0.2.1", "10.0.2.2", "10.0.2.3"), ("10.0.2.4", "10.0.2.2", "10.0.2.5")),
    (("10.0.2.1", "10.0.2.2"), ()),
])
def test_runtime_commands_take_the_running_slots_to_exactly_the_new_endpoints(
        before: tuple[str, ...], after: tuple[str, ...]) -> None:
    s1, s2 = shard("shop", _api(endpoints=before)), shard("shop", _api(endpoints=after))
    old, new = _two(document(shards=[s1]), document(shards=[s2]), [s1], [s2])
    commands = runtime_commands(old, new)
    assert commands is not None
    state = _run(dict(old.servers), commands)
    enabled = sorted(f"{a}:{p}" for a, p, on in state.values() if on)
    assert enabled == sorted(f"{ip}:8000" for ip in after)
    assert all(state[k] == (v.address, v.port, v.enabled) for k, v in new.servers.items())
    for c in commands:  # a slot leaves the rotation before it moves, and joins it after
        if c.endswith("state maint"):
            key = c.split()[2]
            assert all(commands.index(c) < i for i, d in enumerate(commands) if d.startswith(f"set server {key} addr"))


def test_more_endpoints_than_slots_need_a_reload() -> None:
    s1 = shard("shop", _api(endpoints=("10.0.2.1",)))
    s2 = shard("shop", _api(endpoints=("10.0.2.1", "10.0.2.2", "10.0.2.3")))
    old, new = _two(document(shards=[s1]), document(shards=[s2]), [s1], [s2])
    assert runtime_commands(old, new) is None


def test_a_new_service_needs_a_reload() -> None:
    s1 = shard("shop", _api())
    s2 = shard("shop", _api(), service("db", "10.96.0.14", [("tcp", 5432, "tcp", [endpoint("10.0.3.1", 5432, DB)])]))
    old, new = _two(document(shards=[s1]), document(shards=[s2]), [s1], [s2])
    assert runtime_commands(old, new) is None


def test_split_weights_that_keep_their_sum_change_a_map_at_run_time() -> None:
    def with_weights(w1: int, w2: int) -> dict[str, Any]:
        v1, v2 = [endpoint("10.0.2.1", 8000, API)], [endpoint("10.0.2.2", 8000, API)]
        legs = split("shop/s", [("api-v1", w1, {8080: v1}), ("api-v2", w2, {8080: v2})])
        return shard("shop", service("api", "10.96.0.11", [("http", 8080, "http", v1)], split=legs))
    s1, s2, s3 = with_weights(90, 10), with_weights(50, 50), with_weights(50, 40)
    old, new = _two(document(shards=[s1]), document(shards=[s2]), [s1], [s2])
    path = f"{RUN}/split.shop.api.8080.map"
    assert runtime_commands(old, new) == [
        f"add map {path} 0:49 http:shop.api:8080:api-v1", f"add map {path} 50:99 http:shop.api:8080:api-v2",
        f"del map {path} 0:89", f"del map {path} 90:99"]
    _, changed_sum = _two(document(shards=[s1]), document(shards=[s3]), [s1], [s3])
    assert runtime_commands(old, changed_sum) is None


def test_a_new_source_with_an_existing_route_set_is_a_map_entry_and_a_new_route_set_a_reload() -> None:
    base = [Grant(WEB, (READ,))]
    old, new = _two(document(inbound=[inbound_port(8000, sources=base)]),
                    document(inbound=[inbound_port(8000, sources=[*base, Grant(PAYMENTS, (READ,))])]))
    assert runtime_commands(old, new) == [f"add map {RUN}/inbound-access.map 8000:{PAYMENTS} routes1"]
    _, other = _two(document(inbound=[inbound_port(8000, sources=base)]),
                    document(inbound=[inbound_port(8000, sources=[*base, Grant(PAYMENTS, (WRITE,))])]))
    assert runtime_commands(old, other) is None


def test_a_changed_rate_limit_or_mtls_mode_needs_a_reload() -> None:
    port = inbound_port(8000, allow_all=True, rate_limits=[rate_limit("a", "10r/s")])
    faster = inbound_port(8000, allow_all=True, rate_limits=[rate_limit("a", "20r/s")])
    old, new = _two(document(inbound=[port], access="allow"), document(inbound=[faster], access="allow"))
    assert runtime_commands(old, new) is None
    old, new = _two(document(mtls="strict"), document(mtls="permissive"))
    assert runtime_commands(old, new) is None


def test_the_same_document_gives_no_command_at_all() -> None:
    s = shard("shop", _api())
    old, new = _two(document(shards=[s]), document(shards=[s]), [s], [s])
    assert runtime_commands(old, new) == [] and old.text == new.text
