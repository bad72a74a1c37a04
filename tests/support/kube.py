"""A real Kubernetes API server for tests: etcd and kube-apiserver on loopback, started once per session.

Theory of operation: `scripts/kube` builds kube-apiserver 1.20 from Debian's source package and caches it, with helm
and kubectl, in /var/cache/meshloom/kube/<version>/ (or $MESHLOOM_KUBE_CACHE/<version>/); etcd is Debian's
etcd-server. `start_kube_api()` starts etcd on free loopback ports with its data in a temporary folder, then the API
server on a free secure port of 127.0.0.1 with a serving certificate from a throwaway CA, an admin bearer token
(group system:masters), RBAC, service-account signing keys, and the MutatingAdmissionWebhook plugin, and waits for
/readyz. The `kube_api` fixture does this once per session and tears it all down at the end.

There is no kube-controller-manager, scheduler or kubelet, so tests play them: `create_node`, `bind_pod` and
`set_pod_running` do what a scheduler and a kubelet would, Endpoints are written by the test, deleted namespaces stay
Terminating for ever (use a unique namespace per test: `unique_namespace`), and Deployments never get pods. The
ServiceAccount admission plugin is off because nothing would create the `default` service account and its token:
a pod gets exactly the serviceAccountName it is created with (empty when none).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Keep in step with KUBE_VERSION in scripts/kube: the cache directory is keyed by it.
KUBE_VERSION = "1.20.2"
BUILD_HINT = "run scripts/kube to build kube-apiserver"
_READY_TIMEOUT = 90.0  # seconds; the server is usually ready in 3-5 s, but two shared cores can be very busy


class KubeUnavailable(Exception):
    """The binaries are missing or the servers did not start; the message says which and what to do."""


def bin_dir() -> Path:
    """Where scripts/kube caches kube-apiserver, helm and kubectl for this version."""
    return Path(os.environ.get("MESHLOOM_KUBE_CACHE", "/var/cache/meshloom/kube")) / KUBE_VERSION


def find_binaries() -> dict[str, Path]:
    """kube-apiserver, helm, kubectl (from the cache) and etcd (from PATH); KubeUnavailable names what is missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in ("kube-apiserver", "helm", "kubectl"):
        path = bin_dir() / name
        if os.access(path, os.X_OK):
            found[name] = path
        else:
            missing.append(str(path))
    etcd = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    if etcd:
        found["etcd"] = Path(etcd)
    else:
        missing.append("etcd (Debian etcd-server)")
    if missing:
        raise KubeUnavailable(f"missing {', '.join(missing)}: {BUILD_HINT}")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_name(prefix: str = "t") -> str:
    """A DNS-1123 name unique to this run: namespaces and cluster-scoped objects live for the whole session."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class KubeAPI:
    """A running API server: where it is, how to authenticate, and helpers that play the missing controllers."""

    url: str
    token: str
    ca_file: Path
    kubeconfig: Path
    workdir: Path
    binaries: dict[str, Path]
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    # -- clients ------------------------------------------------------------------------------------------------

    @property
    def helm(self) -> Path:
        return self.binaries["helm"]

    @property
    def kubectl(self) -> Path:
        return self.binaries["kubectl"]

    def env(self) -> dict[str, str]:
        """An environment for helm/kubectl subprocesses: this server's kubeconfig, and helm's state kept private."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        for var, sub in (("HELM_CACHE_HOME", "helm/cache"), ("HELM_CONFIG_HOME", "helm/config"),
                         ("HELM_DATA_HOME", "helm/data")):
            env[var] = str(self.workdir / sub)
        return env

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` authenticated as the admin; close it when done (or use `with`)."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        configuration.ssl_ca_cert = str(self.ca_file)
        configuration.verify_ssl = True
        configuration.api_key = {"authorization": self.token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(configuration)

    def kubectl_run(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.kubectl), *args], env=self.env(), capture_output=True, text=True,
                              input=input, check=check, timeout=120)

    # -- the parts of a cluster that are missing ------------------------------------------------------------------

    def create_namespace(self, name: str | None = None, labels: Mapping[str, str] | None = None) -> str:
        """Creates a namespace (a unique one when no name is given) and returns its name; an existing one is kept."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        name = name or unique_name("ns")
        with self.api_client() as api:
            body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=dict(labels or {})))
            try:
                client.CoreV1Api(api).create_namespace(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
        return name

    def unique_namespace(self, prefix: str = "ns", labels: Mapping[str, str] | None = None) -> str:
        return self.create_namespace(unique_name(prefix), labels)

    def create_node(self, name: str | None = None, labels: Mapping[str, str] | None = None) -> str:
        """A Node reported Ready, as a kubelet would register it; returns its name (unique when none is given)."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        name = name or unique_name("node")
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            body = client.V1Node(metadata=client.V1ObjectMeta(
                name=name, labels={"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}))
            try:
                core.create_node(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            core.patch_node_status(name, {"status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "played by a test",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}]}})
        return name

    def bind_pod(self, namespace: str, pod: str, node: str) -> None:
        """What the scheduler does: POST pods/binding, which sets the pod's spec.nodeName."""
        from kubernetes import client

        with self.api_client() as api:
            body = client.V1Binding(metadata=client.V1ObjectMeta(name=pod),
                                    target=client.V1ObjectReference(api_version="v1", kind="Node", name=node))
            # The client cannot deserialize the Status this returns (a known quirk), so read it raw.
            client.CoreV1Api(api).create_namespaced_pod_binding(pod, namespace, body, _preload_content=False)

    def set_pod_running(self, namespace: str, pod: str, ip: str, *, ready: bool = True,
                        containers: tuple[str, ...] = ()) -> None:
        """What a kubelet reports: phase Running, the pod's IP, the Ready condition, and the named containers
        started."""
        from kubernetes import client

        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        flag = "True" if ready else "False"
        status: dict[str, Any] = {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.0.0.1", "startTime": now,
            "conditions": [{"type": t, "status": flag, "lastTransitionTime": now}
                           for t in ("Initialized", "ContainersReady", "Ready", "PodScheduled")],
        }}
        if containers:
            status["status"]["containerStatuses"] = [
                {"name": name, "ready": ready, "started": True, "restartCount": 0, "image": "meshloom",
                 "imageID": "", "state": {"running": {"startedAt": now}}} for name in containers]
        with self.api_client() as api:
            client.CoreV1Api(api).patch_namespaced_pod_status(pod, namespace, status)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stops the API server, then etcd, and removes the working folder."""
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=20)
        self._processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Serving:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


def serving_certificate(common_name: str, ip: str = "127.0.0.1", dns: tuple[str, ...] = ("localhost",)) -> Serving:
    """A throwaway CA and a serving certificate from it, named `common_name`, for `ip` and `dns`."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshloom test CA for {common_name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
          .not_valid_after(now + timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(IPv4Address(ip)), *(x509.DNSName(d) for d in dns)]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Serving(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key),
                   ca.public_bytes(serialization.Encoding.PEM))


def _write_pki(folder: Path) -> None:
    """A throwaway CA, the server's certificate (127.0.0.1, localhost, kubernetes.default.svc) and the
    service-account signing key pair."""
    serving = serving_certificate("kube-apiserver", dns=("localhost", "kubernetes", "kubernetes.default",
                                                         "kubernetes.default.svc"))
    (folder / "ca.crt").write_bytes(serving.ca_pem)
    (folder / "server.crt").write_bytes(serving.cert_pem)
    (folder / "server.key").write_bytes(serving.key_pem)
    sa_key = ec.generate_private_key(ec.SECP256R1())
    (folder / "sa.key").write_bytes(_pem_key(sa_key))
    (folder / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _wait(check: Any, what: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise KubeUnavailable(f"{what} exited with {process.returncode}: {_tail(log)}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise KubeUnavailable(f"{what} not ready after {timeout:.0f} s ({last}): {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-8:])
    except OSError:
        return ""


def start_kube_api() -> KubeAPI:
    """Starts etcd and kube-apiserver on loopback; raises KubeUnavailable when they are missing or fail."""
    binaries = find_binaries()
    workdir = Path(tempfile.mkdtemp(prefix="meshloom-kube-"))
    api = KubeAPI(url="", token=uuid.uuid4().hex, ca_file=workdir / "ca.crt", kubeconfig=workdir / "kubeconfig",
                  workdir=workdir, binaries=binaries)
    try:
        _start(api, binaries, workdir)
    except BaseException:
        api.stop()
        raise
    return api


def _start(api: KubeAPI, binaries: dict[str, Path], workdir: Path) -> None:
    _write_pki(workdir)
    client_port, peer_port, api_port = _free_port(), _free_port(), _free_port()

    etcd_log = workdir / "etcd.log"
    with etcd_log.open("wb") as out:
        etcd = subprocess.Popen([
            str(binaries["etcd"]), "--name", "meshloom-test", "--data-dir", str(workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"meshloom-test=http://127.0.0.1:{peer_port}",
            "--log-level", "warn", "--logger", "zap",
        ], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    api._processes.append(etcd)

    def etcd_healthy() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{client_port}/health", timeout=2) as response:
            return b"true" in response.read()

    _wait(etcd_healthy, "etcd", etcd, etcd_log, 60)

    (workdir / "tokens.csv").write_text(f"{api.token},meshloom-admin,meshloom-admin,system:masters\n")
    api_log = workdir / "kube-apiserver.log"
    with api_log.open("wb") as out:
        server = subprocess.Popen([
            str(binaries["kube-apiserver"]),
            "--etcd-servers", f"http://127.0.0.1:{client_port}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(api_port),
            "--tls-cert-file", str(workdir / "server.crt"), "--tls-private-key-file", str(workdir / "server.key"),
            "--cert-dir", str(workdir / "certs"),
            "--token-auth-file", str(workdir / "tokens.csv"),
            "--authorization-mode", "RBAC",
            "--service-account-key-file", str(workdir / "sa.pub"),
            "--service-account-signing-key-file", str(workdir / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--api-audiences", "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range", "10.96.0.0/16",
            "--enable-admission-plugins", "NamespaceLifecycle,LimitRanger,MutatingAdmissionWebhook,"
            "ValidatingAdmissionWebhook,ResourceQuota",
            "--disable-admission-plugins", "ServiceAccount",
            # Loopback may not be an Endpoints address, so the `kubernetes` service is not reconciled.
            "--endpoint-reconciler-type", "none",
            # Webhooks named by service resolve through Endpoints (which tests write) rather than a cluster IP.
            "--enable-aggregator-routing=true",
            "--allow-privileged=true",
            "--profiling=false",
            "--v", "1",
        ], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    api._processes.append(server)
    api.url = f"https://127.0.0.1:{api_port}"

    context = ssl.create_default_context(cafile=str(api.ca_file))

    def api_ready() -> bool:
        request = urllib.request.Request(f"{api.url}/readyz", headers={"Authorization": f"Bearer {api.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                return response.status == 200
        except urllib.error.HTTPError:
            return False  # 500 while post-start hooks run

    _wait(api_ready, "kube-apiserver", server, api_log, _READY_TIMEOUT)
    api.kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "meshloom-test", "preferences": {},
        "clusters": [{"name": "meshloom-test", "cluster": {"server": api.url,
                                                           "certificate-authority": str(api.ca_file)}}],
        "users": [{"name": "meshloom-admin", "user": {"token": api.token}}],
        "contexts": [{"name": "meshloom-test", "context": {"cluster": "meshloom-test", "user": "meshloom-admin"}}],
    }))
    api.kubeconfig.chmod(0o600)


@pytest.fixture(scope="session")
def kube_api() -> Iterator[KubeAPI]:
    """A real API server for the whole session; skipped where the binaries are missing, except in CI (CI=true)."""
    try:
        api = start_kube_api()
    except KubeUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Kubernetes API server could not start: {exc} (CI=true: these tests must run)",
                        pytrace=False)
        pytest.skip(str(exc) if BUILD_HINT in str(exc) else f"the Kubernetes API server could not start: {exc}")
    try:
        yield api
    finally:
        api.stop()
