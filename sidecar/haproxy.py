"""The sidecar's HAProxy configuration, rendered from its document and the outbound shards it names. Pure: no I/O.

Theory of operation
-------------------
One HAProxy (master-worker) per pod carries every byte the pod sends or receives. iptables REDIRECTs the pod's
outbound TCP to the **outbound** port (15001) and its inbound TCP to the **inbound** port (15006); HAProxy's `dst`
and `dst_port` then return the connection's *original* destination (SO_ORIGINAL_DST). HAProxy's own connections
(uid 2102) are not redirected.

Outbound (frontend `outbound`, TCP, on 127.0.0.1 where REDIRECT sends locally made connections):

- the original `ip:port` is looked up in `outbound.map`, a runtime-changeable map from each Service's virtual
  address and port to the backend of that Service port, named `<protocol>:<namespace>.<service>:<port>` so that the
  Prometheus metrics are per destination (`proxy` label). Service ports whose protocol is http or grpc are proxied
  at layer 7 (`tcp-request content switch-mode http`: HTTP/1 and HTTP/2 prior knowledge are both detected, and
  routing decisions are then taken per request); everything else at layer 4;
- a backend's servers are the Service port's endpoints. Endpoints whose `spiffeId` is set have a sidecar: they are
  reached with mutual TLS, presenting our SVID (`crt svid.pem`), trusting only the mesh bundle (`ca-file bundle.pem`)
  and pinning the peer's service account with `verifyhost <sa>.<ns>.sa` (every SVID carries that DNS SAN, since
  HAProxy 2.8 cannot match URI SANs). Endpoints without one get plain traffic. mtls `off`: plain everywhere;
- servers are **slots**: each (backend, identity) group has `slot_count(n)` of them (the next power of two above
  the number of endpoints), placed by a hash of `ip:port` with linear probing so that an endpoint keeps its slot
  while others come and go. Unused slots are parked (`disabled`, at 127.0.0.1:1). An endpoint change is then
  `set server <backend>/<slot> addr ... port ...` and `state ready|maint` on the runtime API, not a reload; so is
  a shrinking group; growing past the slots (twice as many endpoints) reloads;
- a connection to a **pod address** of the mesh (a headless Service, a StatefulSet peer) is found in `pods.map`
  (`ip:port` -> `<sa>.<ns>.sa`) and sent, at layer 4, to its original destination with mutual TLS, the peer pinned by
  SNI (HAProxy checks the certificate against the SNI when no `verifyhost` is set);
- any other destination passes through untouched (`server orig 0.0.0.0` keeps the original address and port), as
  NGINX Service Mesh lets traffic leave the mesh.

TrafficSplit. For each root Service port, the legs are the backend Services that have that port (SMI: a backend
without it gets none of its traffic), each with a dedicated backend `<root backend>:<leg>` in the root's protocol
(a leg naming the root itself uses the root's backend). The choice is `rand(<sum of weights>)` looked up in a
runtime-changeable integer-range map (`split.<ns>.<service>.<port>.map`: `0:89 -> leg 1`, `90:99 -> leg 2`), per
request at layer 7 and per connection at layer 4. With HTTPRouteGroup matches the split applies only to requests
matching one of them (method AND path regex, anchored at the start, AND every header regex), the others go to the
root. A split with matches on a layer 4 port never applies (a TCP connection cannot match a route). A change of
the weights keeps their sum (runtime); a change of the sum is a reload.

CircuitBreaker -> every server of the destination's backends (and of its split legs) gets
`check observe layer7|layer4 error-limit <errors> on-error mark-down`, with `inter`, `fastinter` and `downinter`
all `timeoutSeconds`, `rise 1 fall 1`; the fallback Service's endpoints are `backup` servers (`option allbackups`).
So a server that fails `errors` times in a row is taken out at once and health-checked again after `timeoutSeconds`;
while every server is out, traffic goes to the fallback (or gets a 503 without one). This is nginx's `max_fails` /
`fail_timeout` / `backup`, which NGINX Service Mesh uses, with two differences: HAProxy counts *consecutive*
errors (a success resets the count) rather than errors within a window, and the circuit closes on a passing health
check (a connection, and a TLS handshake with the peer's sidecar) rather than after a fixed time. At layer 7 the
errors are connection failures, timeouts and 5xx answers other than 501 and 505 -- including a destination's 503
for a rate limit, which nginx's default `proxy_next_upstream` would not count; at layer 4, connection failures.
Only the servers of Services with a CircuitBreaker are health-checked, every `timeoutSeconds`.

Inbound (frontend `inbound` on the inbound port, all addresses):

- mtls `strict`: the bind terminates TLS with `verify required` against the bundle, and a fail-closed rule rejects
  any connection that did not present a verified certificate (`reject unless { ssl_c_used } { ssl_c_verify 0 }`):
  `commit ssl cert` of a leaf without DNS SAN or CN silently drops `verify required` (TESTBED.md);
- mtls `permissive` (and `off`, see below): one plain bind. A TLS ClientHello offering the ALPN `meshloom` (which our
  outbound side always offers) is mesh traffic: it is passed, with a PROXY v2 header keeping its addresses, to the
  internal frontend `inbound-mtls` (an abstract socket) which terminates it exactly as strict does. Plain text is
  handled on the spot; other TLS (the application's own, from outside the mesh) passes through at layer 4 with
  access control `allow`, and is refused with `deny` (it has no identity, and passing it would carry its requests
  past the access, body size and rate rules). The peek waits up to 5 s for the client's first bytes, so
  server-first protocols on a permissive port start late;
- mtls `off`: the outbound side sends plain text; the inbound side is the permissive one, so that a peer whose
  pod annotation says `permissive` or `strict` still reaches it;
- the client's SPIFFE ID is read by the Lua fetch `lua.meshloom_spiffe_id` (lua/spiffe.lua walks `ssl_c_der` to
  the one URI SAN; a certificate without exactly one `spiffe://` URI SAN has no identity), kept in `sess.client`,
  logged, and passed to the application in `x-meshloom-client-id` (any header of that name from the client is
  removed first);
- access control `deny`: `inbound-access.map` maps `<port>:<spiffe id>` to a grant: `all` (the document's grants
  with `routes: null`, which TCPRoute rules give) or a route-set label `routes<n>` whose HTTPRouteGroup matches are
  rendered as ACLs. A layer 4 port needs `all`, else the connection is closed; a layer 7 request needs `all` or a
  label whose routes match, else `403`. Plain-text clients have no identity and are denied. The
  map changes at run time (a new source identity with an existing route set); a new route set is a reload;
- access control `allow`: no check;
- the application is reached at `127.0.0.1:<port>` (per port backend `inbound:<port>`, HTTP/2 towards grpc ports),
  ports not in the document at `127.0.0.1` with the original port, at layer 4 (`deny` rejects them);
- clientMaxBodySize: requests whose Content-Length exceeds it get `413` (chunked bodies are not measured).

RateLimit (layer 7 ports). Each limit of a port has a stick table (`ratelimit:<port>:<n>`) counting
`http_req_rate` over a window, and a sticky counter per request it applies to (port, route matches, source).
A limit with sources keys its counter by the client's SPIFFE ID and, as NGINX Service Mesh does, divides the rate
evenly among the sources (two sources at 100r/m: each gets 100 requests per 2 minutes). A limit without sources
applies to every client no other limit of the port names, with one counter for the pod (each pod accepts the whole
rate). Over the limit: **503**, as NGINX Service Mesh answers (nginx's `limit_req_status` default), not 429.
Approximation: the window is 1 s for `r/s` and 60 s for `r/m` (times the number of sources); a request is refused
when more than `rate + burst` arrived in the window. Excess requests are never delayed (HAProxy cannot queue them):
`delay` is read as `nodelay`, so the burst passes at once, as nginx passes it with `nodelay`.

Certificates. `svid.pem` (leaf, chain, key) and `bundle.pem` are loaded once by name; rotations go through
`set ssl cert` / `set ssl ca-file` and their commits, with no reload. TLS session resumption is off on both sides
(`no-tls-tickets`, `tune.ssl.cachesize 0`, `no-ssl-reuse`): a resumed session skips verification, and a session made
under an old root would outlive a trust change (TESTBED.md).

Metrics: frontend `metrics` serves `/metrics` with HAProxy's Prometheus exporter. UDP is not proxied (HAProxy does
not proxy UDP): UDP ports are left out.

Costs (measured here, HAProxy 2.8 / OpenSSL 3): every TLS server has its own SSL context, about 18 KB of memory
and 0.25 ms of start-up each (a plain server about 4.5 KB), and every sidecar holds every Service of the mesh, as in
NGINX Service Mesh. 1,000 Services with 2 endpoints each (4,000 slots) take about 87 MB and 0.9 s to start; with 10
endpoints each (16,000 slots) about 300 MB and 4 s. Past that, slotless backends (one TLS server per backend, the
endpoint chosen by a map and `set-dst`, the peer pinned by SNI as `pods.map` does) would trade per-endpoint
balancing, health checks and statistics for memory.

What changes at run time and what is a reload: `ProxyConfig.structure` digests the configuration without its
server slots, plus the names of the map files. With equal digests, `runtime_commands` turns the differences in
slots (address, port, state) and map entries into runtime API commands, as long as every slot of the new
configuration exists, with the same definition, in the running one; a group that shrank leaves its extra slots
parked. Anything else (a backend, a policy, more slots, a port) needs a reload, which master-worker mode does
without closing the listening sockets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from catalog.policy import AccessControlMode, LoadBalancingMethod, LogFormat, MtlsMode
from catalog.resource import Protocol

LUA_FILE = "spiffe.lua"  # written into run_dir by the Proxy, from the package's lua/ folder
MESH_ALPN = "meshloom"  # what our outbound TLS offers, so a permissive inbound tells mesh TLS from other TLS
CLIENT_ID_HEADER = "x-meshloom-client-id"
SPIFFE_FETCH = "lua.meshloom_spiffe_id"
ACCESS_DENIED_STATUS = 403
RATE_LIMITED_STATUS = 503  # NGINX Service Mesh's answer (nginx limit_req_status default); see the docstring
BODY_TOO_LARGE_STATUS = 413
PARKED = ("127.0.0.1", 1)  # where an unused slot points; it is disabled, so never used
INSPECT_DELAY = "5s"
HARD_STOP_AFTER = "5m"  # an old worker left by a reload closes its last connections after this long
ALL = "all"  # grant: every request on the port

# Backends that are not a Service port's (those are `<protocol>:<namespace>.<service>:<port>[:<split leg>]`);
# sidecar/traffic.py reads the pod's traffic by these names.
PASSTHROUGH_BACKEND = "outbound-passthrough"  # out of the mesh
POD_BACKEND = "outbound-pod"  # to a meshed pod by its address
INBOUND_BACKEND = "inbound:"  # + the application's port
APP_BACKEND = "inbound-app"  # to a port of the pod no Service names
L7 = (Protocol.HTTP.value, Protocol.GRPC.value)
_BALANCE = {
    LoadBalancingMethod.ROUND_ROBIN.value: "roundrobin",
    LoadBalancingMethod.LEAST_CONN.value: "leastconn",
    LoadBalancingMethod.RANDOM.value: "random",
    LoadBalancingMethod.RANDOM_TWO_LEAST_CONN.value: "random(2)",
    LoadBalancingMethod.SOURCE.value: "source",
}
_LOG_REQUEST = ["http-request set-var(txn.method) method", "http-request set-var(txn.path) path"]
_LOG_LEVELS = ("debug", "info", "notice", "warning", "err", "crit", "alert", "emerg")
_SPIFFE = re.compile(r"spiffe://[^/]+/ns/([a-z0-9]([-a-z0-9]*[a-z0-9])?)/sa/([a-z0-9]([-a-z0-9.]*[a-z0-9])?)\Z")
_SIZE = re.compile(r"([0-9]+)([kKmMgG]?)\Z")
_RATE = re.compile(r"([0-9]+)r/(s|m)\Z")


class RenderError(ValueError):
    """The document or a shard cannot be rendered; the message names the field."""


# ------------------------------------------------------------------------------------------------ the API ---
@dataclass(frozen=True, slots=True)
class ProxyPorts:
    inbound: int = 15006
    outbound: int = 15001
    metrics: int = 15090
    # Where each frontend binds. REDIRECT sends locally made connections to 127.0.0.1, and inbound ones to the
    # address of the interface they came in on. "" binds every IPv4 address.
    inbound_address: str = ""
    outbound_address: str = "127.0.0.1"
    metrics_address: str = ""


@dataclass(frozen=True, slots=True)
class ProxyPaths:
    """Everything HAProxy reads or creates lives in `run_dir`, which belongs to the sidecar's user."""

    run_dir: str

    def file(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    @property
    def socket(self) -> str:
        return self.file("haproxy.sock")

    @property
    def master_socket(self) -> str:
        return self.file("master.sock")

    @property
    def cert(self) -> str:
        return self.file("svid.pem")

    @property
    def ca(self) -> str:
        return self.file("bundle.pem")

    @property
    def pid(self) -> str:
        return self.file("haproxy.pid")

    @property
    def config(self) -> str:
        return self.file("haproxy.cfg")

    @property
    def lua(self) -> str:
        return self.file(LUA_FILE)


@dataclass(frozen=True, slots=True)
class Server:
    """A server slot: what the runtime API can change (address, port, enabled), and what it cannot (its line in the
    configuration without address and state: name, TLS and check options)."""

    address: str
    port: int
    enabled: bool
    definition: str = ""


@dataclass(frozen=True)
class ProxyConfig:
    text: str  # haproxy.cfg
    files: Mapping[str, str]  # file name (relative to run_dir) -> content: the map files
    structure: str  # digest of everything a runtime command cannot change; equal -> no reload
    run_dir: str
    servers: Mapping[str, Server] = field(default_factory=dict)  # "<backend>/<server>" -> slot
    maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # map file name -> key -> value


def slot_count(endpoints: int) -> int:
    """Slots for a group of `endpoints`: the next power of two above it, so one more endpoint (a rolling update's
    surge) always finds a free slot, and growth reloads only when the count doubles."""
    n = 2
    while n <= endpoints:
        n *= 2
    return n


def render(document: Mapping[str, Any], shards: Mapping[str, Mapping[str, Any]], paths: ProxyPaths,
           ports: ProxyPorts = ProxyPorts()) -> ProxyConfig:
    """The whole configuration of one sidecar; `shards` maps each namespace its document names to that shard."""
    return _Renderer(document, shards, paths, ports).build()


def runtime_commands(old: ProxyConfig, new: ProxyConfig) -> list[str] | None:
    """The runtime API commands that take a running `old` to `new`; None when only a reload can.

    Server slots are not part of `structure`: a slot of `new` must exist in `old` with the same definition (else
    None), and a slot of `old` that `new` no longer has (a group that shrank) is parked, so that fewer endpoints
    never need a reload. HAProxy then runs more slots than `new` lists, all parked, until the next reload."""
    if old.structure != new.structure or old.run_dir != new.run_dir:
        return None
    commands: list[str] = []
    for key in sorted(new.servers):
        was, now = old.servers.get(key), new.servers[key]
        if was is None or was.definition != now.definition:
            return None
        commands += _server_commands(key, was, now)
    for key in sorted(set(old.servers) - set(new.servers)):
        was = old.servers[key]
        commands += _server_commands(key, was, Server(PARKED[0], PARKED[1], False, was.definition))
    for name in sorted(new.maps):
        path = os.path.join(new.run_dir, name)
        before, after = old.maps.get(name, {}), new.maps[name]
        # Additions and changes first, removals last: a key is never missing while it is being changed, and
        # split ranges overlap for a moment rather than leave a gap.
        for key in after:
            if key not in before:
                commands.append(f"add map {path} {key} {after[key]}")
            elif before[key] != after[key]:
                commands.append(f"set map {path} {key} {after[key]}")
        for key in before:
            if key not in after:
                commands.append(f"del map {path} {key}")
    return commands


def _server_commands(key: str, was: Server, now: Server) -> list[str]:
    out = []
    if was.enabled and not now.enabled:
        out.append(f"set server {key} state maint")  # out of rotation before it moves
    if (was.address, was.port) != (now.address, now.port):
        out.append(f"set server {key} addr {now.address} port {now.port}")
    if now.enabled and not was.enabled:
        out.append(f"set server {key} state ready")
    return out


# ------------------------------------------------------------------------------------------------ helpers ---
def _quote(text: str) -> str:
    """One HAProxy configuration word: single quotes take everything literally (no escapes, no variables)."""
    return "'" + text.replace("'", "'\\''") + "'"


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise RenderError(f"{where}: missing field {key!r}")
    return obj[key]


def _list(obj: Any, key: str, where: str) -> list[Any]:
    value = _field(obj, key, where)
    if not isinstance(value, list):
        raise RenderError(f"{where}.{key}: must be a list")
    return value


def _verify_host(spiffe_id: str, where: str) -> str:
    """The DNS SAN every SVID carries for its service account: `<sa>.<ns>.sa`."""
    found = _SPIFFE.match(spiffe_id)
    if not found:
        raise RenderError(f"{where}: {spiffe_id!r} is not a workload SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<sa>)")
    return f"{found.group(3)}.{found.group(1)}.sa"


def _body_bytes(size: str) -> int:
    found = _SIZE.match(size)
    if not found:
        raise RenderError(f"clientMaxBodySize: must be a size such as 1m, 64k or 0, got {size!r}")
    return int(found.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[found.group(2).lower()]


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _place(keys: Sequence[str], slots: int) -> list[str | None]:
    """Each key's slot: its hash, then the next free one. Keys are placed in sorted order, so the placement depends
    only on the set of keys, and a key keeps its slot unless a collision chain it sits on changes."""
    table: list[str | None] = [None] * slots
    for key in sorted(keys):
        at = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % slots
        while table[at] is not None:
            at = (at + 1) % slots
        table[at] = key
    return table


@dataclass(frozen=True, slots=True)
class _Endpoint:
    ip: str
    port: int
    spiffe_id: str | None

    @property
    def key(self) -> str:
        return f"{self.ip}:{self.port}"


def _endpoints(raw: Any, where: str) -> list[_Endpoint]:
    if not isinstance(raw, list):
        raise RenderError(f"{where}: must be a list")
    out: dict[str, _Endpoint] = {}
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        ip, port, sid = _field(item, "ip", here), _field(item, "port", here), item.get("spiffeId")
        if not isinstance(ip, str) or not isinstance(port, int) or not (sid is None or isinstance(sid, str)):
            raise RenderError(f"{here}: ip must be a string, port a number and spiffeId a string or null")
        e = _Endpoint(ip, port, sid)
        out.setdefault(e.key, e)
    return list(out.values())


@dataclass(frozen=True, slots=True)
class _Match:
    methods: tuple[str, ...]
    path_regex: str
    headers: tuple[tuple[str, str], ...]

    def acls(self) -> list[str]:
        """The ANDed anonymous ACLs of this match; [] matches every request."""
        out = []
        if self.methods and "*" not in self.methods:
            out.append("{ method " + " ".join(self.methods) + " }")
        if self.path_regex:
            out.append("{ path_reg " + _quote(f"^(?:{self.path_regex})") + " }")
        for name, pattern in self.headers:
            out.append("{ req.hdr(" + name.lower() + ") -m reg " + _quote(pattern) + " }")
        return out


def _matches(raw: Any, where: str) -> tuple[_Match, ...]:
    if not isinstance(raw, list):
        raise RenderError(f"{where}: must be a list")
    out = []
    for i, m in enumerate(raw):
        here = f"{where}[{i}]"
        methods = tuple(str(x).upper() for x in _list(m, "methods", here))
        headers = _field(m, "headers", here)
        if not isinstance(headers, Mapping):
            raise RenderError(f"{here}.headers: must be an object")
        out.append(_Match(methods, str(_field(m, "pathRegex", here)),
                          tuple(sorted((str(k), str(v)) for k, v in headers.items()))))
    return tuple(out)


def _condition(prefix: Sequence[str], matches: Sequence[_Match] | None) -> str:
    """`prefix` ANDed with the OR of `matches` (None: no restriction), as an HAProxy condition."""
    if matches is None:
        return " ".join(prefix) if prefix else "TRUE"
    terms = []
    for m in matches:
        words = [*prefix, *m.acls()]
        terms.append(" ".join(words) if words else "TRUE")
    return " || ".join(terms)


# -------------------------------------------------------------------------------------------- the renderer ---
@dataclass
class _Backend:
    name: str
    mode: str  # "http" | "tcp"
    protocol: str
    lines: list[str | tuple[str, Server, str]] = field(default_factory=list)  # text, or (prefix, slot, suffix)


class _Renderer:
    def __init__(self, document: Mapping[str, Any], shards: Mapping[str, Mapping[str, Any]], paths: ProxyPaths,
                 ports: ProxyPorts) -> None:
        self.doc = document
        self.shards = shards
        self.paths = paths
        self.ports = ports
        where = "document"
        try:
            self.mtls = MtlsMode(_field(document, "mtlsMode", where))
            self.access = AccessControlMode(_field(document, "accessControlMode", where))
            self.log_format = LogFormat(_field(document, "logFormat", where))
        except ValueError as exc:
            raise RenderError(f"document: {exc}") from None
        method = _field(document, "loadBalancingMethod", where)
        if method not in _BALANCE:
            raise RenderError(f"document.loadBalancingMethod: unknown method {method!r}")
        self.balance = _BALANCE[method]
        level = _field(document, "logLevel", where)
        if level not in _LOG_LEVELS:
            raise RenderError(f"document.logLevel: unknown level {level!r}")
        self.log_level = level
        self.body_limit = _body_bytes(str(_field(document, "clientMaxBodySize", where)))
        self.tls_out = self.mtls is not MtlsMode.OFF
        self.backends: list[_Backend] = []
        self.maps: dict[str, dict[str, str]] = {}
        self.servers: dict[str, Server] = {}
        self.log_line = self._log_format()

    # ---- output
    def build(self) -> ProxyConfig:
        outbound = self._outbound()
        inbound = self._inbound()
        sections = [self._global(), self._defaults(), *outbound, *inbound, self._metrics()]
        backends = [self._backend_text(b, masked=False) for b in self.backends]
        masked = [self._backend_text(b, masked=True) for b in self.backends]  # without the server slots
        head = "# meshloom sidecar proxy for " + str(self.doc.get("sidecar", "?")) + \
            "; rendered, do not edit\n"
        text = head + "\n".join([*sections, *backends])
        skeleton = "\n".join([*sections, *masked, "maps: " + " ".join(sorted(self.maps))])
        files = {name: "".join(f"{k} {v}\n" for k, v in entries.items()) for name, entries in self.maps.items()}
        return ProxyConfig(text, files, _digest(skeleton), self.paths.run_dir, dict(self.servers),
                           {k: dict(v) for k, v in self.maps.items()})

    def _backend_text(self, b: _Backend, *, masked: bool) -> str:
        out = [f"backend {b.name}", f"    mode {b.mode}"]
        if b.mode == "http" and b.name.startswith(("http:", "grpc:")):
            # Both ends are sidecars and the server side checks the client certificate of every connection and
            # decides access per request, so requests may share one mutual-TLS connection whatever client
            # connection they came on; under the default (`safe`) the first request of each client connection
            # opened a new one: a full handshake per request on both sidecars for one-request-per-connection clients.
            out.append("    http-reuse always")
        for line in b.lines:
            if isinstance(line, str):
                out.append("    " + line)
                continue
            prefix, slot, suffix = line
            if not masked:
                state = "" if slot.enabled else " disabled"
                out.append(f"    {prefix} {slot.address}:{slot.port}{state} {suffix}".rstrip())
        return "\n".join(out) + "\n"

    def _map(self, name: str) -> str:
        self.maps.setdefault(name, {})
        return self.paths.file(name)

    # ---- global sections
    def _global(self) -> str:
        counters = max([3, *(len(limits) for limits in self._limits_by_port().values())])
        lines = [
            "global",
            f"    stats socket {self.paths.socket} mode 600 level admin expose-fd listeners",
            "    stats timeout 30s",
            f"    hard-stop-after {HARD_STOP_AFTER}",
            f"    log stdout format raw local0 {self.log_level}",
            f"    lua-load-per-thread {self.paths.lua}",
            # Session resumption would skip verification and outlive a trust change: off on both sides.
            "    tune.ssl.cachesize 0",
            "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
            "    ssl-default-server-options ssl-min-ver TLSv1.2 no-tls-tickets",
        ]
        if counters > 3:
            lines.append(f"    tune.stick-counters {counters}")
        return "\n".join(lines) + "\n"

    def _log_format(self) -> str:
        # Every frontend is declared TCP (layer 7 is switched to per connection), where HTTP-only log variables
        # are refused: the method and path are logged from variables that the layer 7 rules set.
        if self.log_format is LogFormat.JSON:
            fmt = ('{"time":"%t","frontend":"%ft","backend":"%b","server":"%s","src":"%ci:%cp",'
                   '"client_id":"%[var(sess.client)]","method":"%[var(txn.method)]",'
                   '"path":"%[var(txn.path),json(utf8s)]","status":"%ST","bytes":%B,"duration_ms":%Tt,'
                   '"termination":"%ts"}')
        else:
            fmt = ('%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %ST %B %ts %ac/%fc/%bc/%sc/%rc '
                   'client=%[var(sess.client)] %[var(txn.method)] %[var(txn.path)]')
        return f"log-format {_quote(fmt)}"

    def _defaults(self) -> str:
        return "\n".join([
            "defaults",
            "    mode tcp",
            "    log global",
            "    option dontlognull",
            "    retries 2",
            "    option redispatch 1",
            "    timeout connect 5s",
            "    timeout client 1h",
            "    timeout server 1h",
            "    timeout client-fin 30s",
            "    timeout server-fin 30s",
            "    timeout http-request 30s",
            "    timeout http-keep-alive 60s",
            "    timeout check 5s",
        ]) + "\n"

    def _metrics(self) -> str:
        return "\n".join([
            "frontend metrics",
            "    mode http",
            f"    bind {self.ports.metrics_address}:{self.ports.metrics}",
            "    no log",
            "    http-request use-service prometheus-exporter if { path /metrics }",
            "    http-request return status 404",
        ]) + "\n"

    # ---- outbound
    def _services(self) -> list[tuple[str, str, Mapping[str, Any]]]:
        out = []
        wanted = _field(_field(self.doc, "outbound", "document"), "shards", "document.outbound")
        if not isinstance(wanted, Mapping):
            raise RenderError("document.outbound.shards: must be an object")
        for ns in sorted(wanted):
            shard = self.shards.get(ns)
            if shard is None:
                raise RenderError(f"outbound shard {ns!r}: named by the document but not given")
            services = _field(shard, "services", f"shard {ns}")
            if not isinstance(services, Mapping):
                raise RenderError(f"shard {ns}.services: must be an object")
            for name in sorted(services):
                out.append((ns, name, services[name]))
        return out

    def _outbound(self) -> list[str]:
        outbound_map: dict[str, str] = {}
        pods: dict[str, str] = {}
        rules: list[str] = []  # split rules, before the plain routing
        l7_backends: list[str] = []
        services = self._services()
        by_ns = {(ns, name): svc for ns, name, svc in services}
        for ns, name, svc in services:
            where = f"shard {ns}.services.{name}"
            address = svc.get("address")
            breaker = svc.get("circuitBreaker")
            for i, port in enumerate(_list(svc, "ports", where)):
                here = f"{where}.ports[{i}]"
                number, protocol = _field(port, "port", here), _field(port, "protocol", here)
                if protocol == Protocol.UDP.value:
                    continue
                endpoints = _endpoints(_field(port, "endpoints", here), f"{here}.endpoints")
                for e in endpoints:
                    if e.spiffe_id is not None:
                        pods[e.key] = _verify_host(e.spiffe_id, f"{here}.endpoints")
                root = f"{protocol}:{ns}.{name}:{number}"
                self._service_backend(root, protocol, endpoints, breaker, by_ns, ns, where)
                if protocol in L7:
                    l7_backends.append(root)
                if address:
                    outbound_map[f"{address}:{number}"] = root
                split = svc.get("split")
                if split is not None:
                    rules += self._split(split, ns, name, number, protocol, root, by_ns, f"{where}.split")
        self.maps["outbound.map"] = dict(sorted(outbound_map.items()))

        lines = [
            "frontend outbound",
            "    mode tcp",
            "    " + self.log_line,
            f"    bind {self.ports.outbound_address}:{self.ports.outbound}",
            "    tcp-request content set-var(sess.dport) dst_port",
            "    tcp-request content set-var(sess.dst) dst,concat(:,sess.dport)",
            f"    tcp-request content set-var(sess.be) var(sess.dst),map_str({self.paths.file('outbound.map')})",
        ]
        if self.tls_out:
            self.maps["pods.map"] = dict(sorted(pods.items()))
            lines.append(f"    tcp-request content set-var(sess.peer) var(sess.dst),"
                         f"map_str({self._map('pods.map')}) unless {{ var(sess.be) -m found }}")
        if l7_backends:
            lines.append("    tcp-request content switch-mode http if { var(sess.be) -m beg http: grpc: }")
            lines += ["    " + r for r in _LOG_REQUEST]
        lines += ["    " + r for r in rules]
        lines.append("    use_backend %[var(sess.be)] if { var(sess.be) -m found }")
        if self.tls_out:
            lines.append(f"    use_backend {POD_BACKEND} if {{ var(sess.peer) -m found }}")
        lines.append(f"    default_backend {PASSTHROUGH_BACKEND}")

        passthrough = _Backend(PASSTHROUGH_BACKEND, "tcp", "tcp")
        # A connection made straight to this frontend has itself as original destination: refuse the loop.
        passthrough.lines += [f"tcp-request content reject if {{ dst_port {self.ports.outbound} }} {{ dst_is_local }}",
                              "server orig 0.0.0.0"]
        self.backends.append(passthrough)
        if self.tls_out:
            pod = _Backend(POD_BACKEND, "tcp", "tcp")
            pod.lines.append(f"server pod 0.0.0.0 {self._tls_client()} sni var(sess.peer)")
            self.backends.append(pod)
        return ["\n".join(lines) + "\n"]

    def _tls_client(self) -> str:
        return (f"ssl crt {self.paths.cert} ca-file {self.paths.ca} verify required alpn {MESH_ALPN} "
                "no-ssl-reuse")

    def _service_backend(self, name: str, protocol: str, endpoints: list[_Endpoint], breaker: Any,
                         by_ns: Mapping[tuple[str, str], Mapping[str, Any]], ns: str, where: str) -> None:
        b = _Backend(name, "http" if protocol in L7 else "tcp", protocol)
        b.lines.append(f"balance {self.balance}")
        check = ""
        fallback: list[_Endpoint] = []
        if breaker is not None:
            here = f"{where}.circuitBreaker"
            errors, timeout = _field(breaker, "errors", here), _field(breaker, "timeoutSeconds", here)
            if not isinstance(errors, int) or not isinstance(timeout, int) or errors < 1 or timeout < 1:
                raise RenderError(f"{here}: errors and timeoutSeconds must be whole numbers above 0")
            layer = "layer7" if b.mode == "http" else "layer4"
            check = (f"check inter {timeout}s fastinter {timeout}s downinter {timeout}s rise 1 fall 1 "
                     f"observe {layer} error-limit {errors} on-error mark-down")
            fb = breaker.get("fallback")
            if fb is not None:
                fallback = _endpoints(_field(fb, "endpoints", f"{here}.fallback"), f"{here}.fallback.endpoints")
                b.lines.append("option allbackups")
        self._slots(b, "", endpoints, check)
        if fallback:
            self._slots(b, "fallback.", fallback, "backup")
        self.backends.append(b)

    def _slots(self, b: _Backend, prefix: str, endpoints: list[_Endpoint], extra: str) -> None:
        groups: dict[str, list[_Endpoint]] = {}
        for e in endpoints:
            group = "plain"
            if self.tls_out and e.spiffe_id is not None:
                group = _verify_host(e.spiffe_id, f"backend {b.name}")[: -len(".sa")]
            groups.setdefault(group, []).append(e)
        by_key = {e.key: e for e in endpoints}
        for group in sorted(groups):
            members = groups[group]
            options = []
            if group != "plain":
                options.append(f"{self._tls_client()} verifyhost {group}.sa")
            if b.protocol == Protocol.GRPC.value:
                options.append("proto h2")
            tls_check = " check-ssl" if group != "plain" and extra.startswith("check") else ""
            if extra:
                options.append(extra + tls_check)
            suffix = " ".join(options)
            for n, key in enumerate(_place([e.key for e in members], slot_count(len(members))), start=1):
                server = f"{prefix}{group}-{n}"
                found = by_key.get(key) if key is not None else None
                definition = f"{b.name} server {server} {suffix}"
                slot = (Server(found.ip, found.port, True, definition) if found
                        else Server(PARKED[0], PARKED[1], False, definition))
                self.servers[f"{b.name}/{server}"] = slot
                b.lines.append((f"server {server}", slot, suffix))

    def _split(self, split: Any, ns: str, root_name: str, number: int, protocol: str, root: str,
               by_ns: Mapping[tuple[str, str], Mapping[str, Any]], where: str) -> list[str]:
        raw_matches = split.get("matches")
        matches = None if raw_matches is None else _matches(raw_matches, f"{where}.matches")
        if matches is not None and (not matches or protocol not in L7):
            return []  # no request can match: everything goes to the root
        legs: list[tuple[str, int]] = []
        for i, leg in enumerate(_list(split, "backends", where)):
            here = f"{where}.backends[{i}]"
            service, weight = _field(leg, "service", here), _field(leg, "weight", here)
            if not isinstance(weight, int) or weight <= 0:
                continue
            port = next((p for p in _list(leg, "ports", here) if _field(p, "port", here) == number), None)
            if port is None:
                continue  # SMI: a backend without the root's port gets none of its traffic
            if service == root_name:
                legs.append((root, weight))
                continue
            name = f"{root}:{service}"
            endpoints = _endpoints(_field(port, "endpoints", here), f"{here}.endpoints")
            leg_svc = by_ns.get((ns, service), {})
            self._service_backend(name, protocol, endpoints, leg_svc.get("circuitBreaker"), by_ns, ns,
                                  f"shard {ns}.services.{service}")
            legs.append((name, weight))
        if not legs:
            return []
        total, start = sum(w for _, w in legs), 0
        entries: dict[str, str] = {}
        for name, weight in legs:
            entries[f"{start}:{start + weight - 1}"] = name
            start += weight
        map_name = f"split.{ns}.{root_name}.{number}.map"
        path = self._map(map_name)
        self.maps[map_name] = entries
        cond = _condition(["{ var(sess.be) -m str " + root + " }"], matches)
        return [f"use_backend %[rand({total}),map_int({path})] if {cond}"]

    # ---- inbound
    def _ports(self) -> list[tuple[int, str, Mapping[str, Any]]]:
        out = []
        for i, p in enumerate(_list(self.doc, "inbound", "document")):
            where = f"document.inbound[{i}]"
            if _field(p, "transport", where) != "TCP":
                continue  # HAProxy does not proxy UDP
            number, protocol = _field(p, "port", where), _field(p, "protocol", where)
            if not isinstance(number, int) or not 0 < number < 65536:
                raise RenderError(f"{where}.port: must be a port number")
            out.append((number, str(protocol), p))
        return sorted(out, key=lambda x: x[0])

    def _limits_by_port(self) -> dict[int, list[Mapping[str, Any]]]:
        out: dict[int, list[Mapping[str, Any]]] = {}
        for number, protocol, p in self._ports():
            if protocol in L7:
                limits = [rl for rl in _list(p, "rateLimits", f"inbound port {number}")
                          if rl.get("sources") is None or rl.get("sources")]
                if limits:
                    out[number] = limits
        return out

    def _inbound(self) -> list[str]:
        ports = self._ports()
        l7 = [n for n, proto, _ in ports if proto in L7]
        deny = self.access is AccessControlMode.DENY
        grants: dict[str, str] = {}
        route_sets: dict[str, tuple[str, tuple[_Match, ...]]] = {}  # canonical routes -> (label, matches)
        if deny:
            for number, protocol, p in ports:
                for i, g in enumerate(_list(p, "sources", f"inbound port {number}")):
                    here = f"inbound port {number}.sources[{i}]"
                    sid, routes = _field(g, "spiffeId", here), g.get("routes")
                    if routes is None:
                        grants[f"{number}:{sid}"] = ALL
                    elif protocol in L7 and routes:
                        canonical = json.dumps(routes, sort_keys=True)
                        if canonical not in route_sets:
                            route_sets[canonical] = (f"routes{len(route_sets) + 1}", _matches(routes, here))
                        grants[f"{number}:{sid}"] = route_sets[canonical][0]
            self.maps["inbound-access.map"] = dict(sorted(grants.items()))

        self._prepare_policy(l7, deny, list(route_sets.values()))
        for number, protocol, _ in ports:
            b = _Backend(f"{INBOUND_BACKEND}{number}", "http" if protocol in L7 else "tcp", protocol)
            h2 = " proto h2" if protocol == Protocol.GRPC.value else ""
            b.lines.append(f"server app 127.0.0.1:{number}{h2}")
            self.backends.append(b)
        app = _Backend(APP_BACKEND, "tcp", "tcp")
        # The application at the original port; never one of the proxy's own ports on 127.0.0.1 (a connection
        # made straight to such a port would be sent back to the proxy itself, again and again).
        local = ("", "0.0.0.0", "127.0.0.1")
        own = sorted({port for port, address in ((self.ports.inbound, self.ports.inbound_address),
                                                  (self.ports.outbound, self.ports.outbound_address),
                                                  (self.ports.metrics, self.ports.metrics_address))
                      if address in local})
        if own:
            app.lines.append("tcp-request content reject if { dst_port " + " ".join(map(str, own)) + " }")
        app.lines.append("server app 127.0.0.1")
        self.backends.append(app)

        tls_bind = f"ssl crt {self.paths.cert} ca-file {self.paths.ca} verify required"
        known = " ".join(str(n) for n, _, _ in ports)
        head = [f"acl known_port dst_port {known}" if ports else "acl known_port always_false"]
        if l7:
            head.append("acl l7_port dst_port " + " ".join(str(n) for n in l7))
        routing = [f"use_backend {INBOUND_BACKEND}%[dst_port] if known_port", f"default_backend {APP_BACKEND}"]
        # Fail closed: `commit ssl cert` of a leaf without DNS SAN or CN drops `verify required` (TESTBED.md).
        verified = ["tcp-request content reject unless { ssl_c_used } { ssl_c_verify 0 }",
                    *self._policy(tls=True), *routing]
        bind = f"bind {self.ports.inbound_address}:{self.ports.inbound}"
        if self.mtls is MtlsMode.STRICT:
            return [self._frontend("inbound", f"{bind} {tls_bind}", [*head, *verified])]

        # permissive and off: plain and TLS on one port; mesh TLS goes to the internal TLS frontend
        internal = f"abns@meshloom-{hashlib.sha256(self.paths.run_dir.encode()).hexdigest()[:12]}-mtls"
        loop = _Backend("inbound-mtls-loop", "tcp", "tcp")
        loop.lines.append(f"server mtls {internal} send-proxy-v2")
        self.backends.append(loop)
        plain = [
            *head,
            f"tcp-request inspect-delay {INSPECT_DELAY}",
            "tcp-request content set-var(sess.mesh) bool(1) "
            f"if {{ req.ssl_hello_type 1 }} {{ req.ssl_alpn {MESH_ALPN} }}",
            "tcp-request content accept if { var(sess.mesh) -m bool }",
            # deny: TLS that is not the mesh's has no identity and would carry its requests past every layer 7
            # rule (access, body size, rate) to the application's own TLS: refuse it. allow: pass it through.
            *(["tcp-request content reject if { req.ssl_hello_type 1 }"] if self.deny else []),
            *self._policy(tls=False),
            "use_backend inbound-mtls-loop if { var(sess.mesh) -m bool }",
            *([] if self.deny else [f"use_backend {APP_BACKEND} if {{ req.ssl_hello_type 1 }}"]),  # the app's own TLS
            *routing,
        ]
        return [self._frontend("inbound", bind, plain),
                self._frontend("inbound-mtls", f"bind {internal} accept-proxy {tls_bind}", [*head, *verified])]

    def _frontend(self, name: str, bind: str, rules: list[str]) -> str:
        return "\n".join([f"frontend {name}", "    mode tcp", "    " + self.log_line, "    " + bind,
                          *("    " + r for r in rules)]) + "\n"

    def _prepare_policy(self, l7: list[int], deny: bool, route_sets: list[tuple[str, tuple[_Match, ...]]]) -> None:
        """The rate-limit tables, and what `_policy` needs: the same rules go into every inbound frontend."""
        self.l7_ports, self.deny, self.route_sets = l7, deny, route_sets
        self.rate_rules: list[str] = []
        for number, entries in sorted(self._limits_by_port().items()):
            named = sorted({str(s) for rl in entries for s in (rl.get("sources") or ())})
            for i, rl in enumerate(entries):
                self.rate_rules += self._rate_limit(number, i, rl, named)
                window, _ = self._window(rl, number)
                table = _Backend(f"ratelimit:{number}:{i}", "tcp", "tcp")
                table.lines.append(f"stick-table type string len 256 size 100k expire {window * 2}s "
                                   f"store http_req_rate({window}s)")
                self.backends.append(table)

    def _policy(self, *, tls: bool) -> list[str]:
        """Access, size and rate rules of an inbound frontend; `tls`: it terminates mesh TLS (a client id)."""
        out = []
        if tls:
            # Once per connection (content rules run again for every HTTP request); only a SPIFFE ID is an identity.
            out.append(f"tcp-request content set-var(sess.svid_uri) {SPIFFE_FETCH} "
                       "if { ssl_c_used } !{ var(sess.svid_uri) -m found }")
            out.append("tcp-request content set-var(sess.client) var(sess.svid_uri) "
                       "if !{ var(sess.client) -m found } { var(sess.svid_uri) -m beg spiffe:// }")
        if self.deny:
            out.append(f"tcp-request content set-var(sess.grant) dst_port,concat(:,sess.client),"
                       f"map_str({self.paths.file('inbound-access.map')}) if {{ var(sess.client) -m found }}")
            out.append("tcp-request content reject if " + ("!l7_port " if self.l7_ports else "") +
                       f"!{{ var(sess.grant) -m str {ALL} }}")
        if not self.l7_ports:
            return out
        out.append("tcp-request content switch-mode http if l7_port" + ("" if tls else " !{ req.ssl_hello_type 1 }"))
        out += _LOG_REQUEST
        out.append(f"http-request del-header {CLIENT_ID_HEADER}")
        out.append(f"http-request set-header {CLIENT_ID_HEADER} %[var(sess.client)] if {{ var(sess.client) -m found }}")
        if self.deny:
            out.append(f"http-request set-var(txn.allowed) bool(1) if {{ var(sess.grant) -m str {ALL} }}")
            for label, matches in self.route_sets:
                cond = _condition(["{ var(sess.grant) -m str " + label + " }"], matches)
                out.append(f"http-request set-var(txn.allowed) bool(1) if {cond}")
            out.append(f"http-request deny deny_status {ACCESS_DENIED_STATUS} unless {{ var(txn.allowed) -m bool }}")
        if self.body_limit:
            out.append(f"http-request deny deny_status {BODY_TOO_LARGE_STATUS} "
                       f"if {{ req.hdr_val(content-length) gt {self.body_limit} }}")
        return out + self.rate_rules

    def _window(self, rl: Mapping[str, Any], number: int) -> tuple[int, int]:
        """(window in seconds, requests allowed in it) of a rate limit."""
        where = f"inbound port {number}.rateLimits[{rl.get('policy')}]"
        found = _RATE.match(str(_field(rl, "rate", where)))
        burst = _field(rl, "burst", where)
        if not found or not isinstance(burst, int) or burst < 0:
            raise RenderError(f"{where}: rate must be like 10r/s or 600r/m and burst a whole number")
        sources = rl.get("sources") or ()
        window = (1 if found.group(2) == "s" else 60) * max(1, len(sources))
        return window, int(found.group(1)) + burst

    def _rate_limit(self, number: int, i: int, rl: Mapping[str, Any], named: list[str]) -> list[str]:
        where = f"inbound port {number}.rateLimits[{i}]"
        _, allowed = self._window(rl, number)
        sources = rl.get("sources")
        prefix = [f"{{ dst_port {number} }}"]
        if sources is None:
            key = "str(all)"
            if named:
                prefix.append("!{ var(sess.client) -m str " + " ".join(named) + " }")
        else:
            key = "var(sess.client)"
            prefix.append("{ var(sess.client) -m str " + " ".join(str(s) for s in sources) + " }")
        routes = rl.get("routes")
        matches = None if routes is None else _matches(routes, f"{where}.routes")
        if matches is not None and not matches:
            return []
        cond = _condition(prefix, matches)
        table = f"ratelimit:{number}:{i}"
        return [f"http-request track-sc{i} {key} table {table} if {cond}",
                f"http-request deny deny_status {RATE_LIMITED_STATUS} "
                f"if {{ sc_http_req_rate({i},{table}) gt {allowed} }}"]


def parse_map(text: str) -> dict[str, str]:
    """A map file's entries (the inverse of how `render` writes them)."""
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out
