"""A client of HAProxy's runtime API (the admin-level stats socket) and of its master CLI.

Theory of operation
-------------------
Every command opens its own connection to the unix socket, sends one line (plus, for `set ssl cert` and
`set ssl ca-file`, a payload ended by an empty line), half-closes, and reads until HAProxy closes. One command
per connection keeps the client stateless: no prompt to parse, no partial answer left behind by a timeout, and a
command that fails cannot leave the next one reading its output.

The runtime API answers in free text and has no status codes. Each command family has its own way of saying it
worked, so every method here checks its answer and raises `RuntimeCommandError` naming the command (never its
payload: certificates carry private keys) and quoting HAProxy's answer:

- `set server ... state|weight`, `add|set|del|clear map`: silence is success, any text an error;
- `set server ... addr`: "IP changed ...", "no need to change ..." or "... port changed ...";
- `set ssl cert|ca-file`: "transaction created|updated ..." (either case); `commit ssl ...`: ends with "Success!";
- `show stat`: CSV whose first line starts with "# pxname".

A certificate or trust bundle update is `set` then `commit`; a failed `set` or `commit` aborts the transaction,
so the next update starts from a clean state instead of "a transaction is already in progress".

The master CLI (`-S <socket>` in master-worker mode) takes `reload`; HAProxy 2.8 answers it, once the new worker
is up or has failed, with `Success=1` or `Success=0` and the startup messages.
"""

from __future__ import annotations

import csv
import io
import socket
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_TIMEOUT = 10.0


class RuntimeApiError(Exception):
    """Base of every runtime API failure."""


class RuntimeUnavailable(RuntimeApiError):
    """The socket could not be reached: HAProxy is not running, or not yet listening."""


class RuntimeCommandError(RuntimeApiError):
    """HAProxy refused or failed a command; the message names the command and quotes the answer."""

    def __init__(self, command: str, answer: str) -> None:
        self.command = command
        self.answer = answer.strip()
        super().__init__(f"HAProxy runtime API: `{command}` failed: {self.answer or 'no answer'}")


def _exchange(path: str, data: bytes, timeout: float) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise RuntimeUnavailable(f"HAProxy runtime API at {path}: {exc.strerror or exc}") from None
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the master CLI answers only once the client has finished
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")
    except TimeoutError:
        raise RuntimeUnavailable(f"HAProxy runtime API at {path}: no answer within {timeout:g}s") from None
    finally:
        sock.close()


def _command_line(command: str) -> str:
    if "\n" in command or "\r" in command:
        raise ValueError(f"a runtime API command is one line, got {command!r}")
    return command


@dataclass(frozen=True, slots=True)
class RuntimeApi:
    """The worker's runtime API, on the admin-level stats socket."""

    path: str
    timeout: float = DEFAULT_TIMEOUT

    # ---- raw
    def send(self, command: str, payload: str | None = None) -> str:
        """One command and its raw answer; no checking. A payload follows `<<` and ends with an empty line."""
        line = _command_line(command)
        if payload is None:
            return _exchange(self.path, (line + "\n").encode(), self.timeout)
        body = payload.replace("\r\n", "\n").strip("\n")
        if "\n\n" in body:
            raise ValueError(f"`{command}`: a payload cannot hold an empty line (it would end the payload)")
        return _exchange(self.path, f"{line} <<\n{body}\n\n".encode(), self.timeout)

    def run(self, command: str) -> str:
        """A command whose answer `check` judges by its verb; returns the answer."""
        answer = self.send(command)
        check(command, answer)
        return answer

    def run_all(self, commands: Iterable[str]) -> None:
        for command in commands:
            self.run(command)

    # ---- certificates and trust bundles
    def update_certificate(self, path: str, pem: str) -> None:
        """Replace the certificate (leaf, chain, key) that binds and servers load from `path`, without a reload."""
        self._transaction("cert", path, pem)

    def update_ca_file(self, path: str, pem: str) -> None:
        """Replace the trust bundle that binds and servers load from `path` (`ca-file`), without a reload."""
        self._transaction("ca-file", path, pem)

    def _transaction(self, kind: str, path: str, pem: str) -> None:
        set_command = f"set ssl {kind} {path}"
        answer = self.send(set_command, pem)
        if "transaction created" not in answer.lower() and "transaction updated" not in answer.lower():
            self._abort(kind, path)
            raise RuntimeCommandError(set_command, answer)
        commit = f"commit ssl {kind} {path}"
        answer = self.send(commit)
        if not answer.rstrip().endswith("Success!"):
            self._abort(kind, path)
            raise RuntimeCommandError(commit, answer)

    def _abort(self, kind: str, path: str) -> None:
        try:
            self.send(f"abort ssl {kind} {path}")
        except RuntimeUnavailable:
            pass  # nothing to clean up in a process we cannot reach

    # ---- servers and maps
    def set_server_address(self, backend: str, server: str, address: str, port: int) -> None:
        self.run(f"set server {backend}/{server} addr {address} port {port}")

    def set_server_state(self, backend: str, server: str, state: str) -> None:
        self.run(f"set server {backend}/{server} state {state}")

    def add_map(self, map_file: str, key: str, value: str) -> None:
        self.run(f"add map {map_file} {key} {value}")

    def del_map(self, map_file: str, key: str) -> None:
        self.run(f"del map {map_file} {key}")

    def show_map(self, map_file: str) -> dict[str, str]:
        """The entries of a map as HAProxy holds them (key -> value)."""
        command = f"show map {map_file}"
        answer = self.send(command)
        out: dict[str, str] = {}
        for line in answer.splitlines():
            parts = line.split(" ", 2)  # "<ref> <key> <value>"
            if len(parts) != 3 or not parts[0].startswith("0x"):
                if line.strip():
                    raise RuntimeCommandError(command, answer)
                continue
            out[parts[1]] = parts[2]
        return out

    # ---- views
    def show_stat(self) -> list[dict[str, str]]:
        """`show stat`: one row per frontend, backend and server, keyed by HAProxy's CSV column names."""
        command = "show stat"
        answer = self.send(command)
        if not answer.startswith("# "):
            raise RuntimeCommandError(command, answer)
        rows = list(csv.reader(io.StringIO(answer[2:])))
        header = rows[0]
        return [dict(zip(header, row, strict=False)) for row in rows[1:] if row]

    def show_info(self) -> dict[str, str]:
        command = "show info"
        answer = self.send(command)
        info = dict(line.split(": ", 1) for line in answer.splitlines() if ": " in line)
        if "Pid" not in info:
            raise RuntimeCommandError(command, answer)
        return info

    def ssl_cert_serial(self, path: str) -> str:
        """The serial (hex, as HAProxy prints it) of the certificate loaded from `path`."""
        command = f"show ssl cert {path}"
        answer = self.send(command)
        for line in answer.splitlines():
            if line.startswith("Serial: "):
                return line.split(": ", 1)[1].strip()
        raise RuntimeCommandError(command, answer)


# The answers that mean success, by command prefix (longest first): see the module docstring.
_SILENT = ("set server ", "add map ", "set map ", "del map ", "clear map ", "add acl ", "del acl ", "clear acl ",
           "enable ", "disable ", "set weight ")
_ADDR_OK = ("IP changed", "no need to change", "port changed")


def check(command: str, answer: str) -> None:
    """Raise RuntimeCommandError when `answer` is not the success answer of `command`."""
    text = answer.strip()
    if command.startswith("set server ") and " addr " in command:
        if any(ok in text for ok in _ADDR_OK):
            return
        raise RuntimeCommandError(command, answer)
    if command.startswith(_SILENT):
        if text:
            raise RuntimeCommandError(command, answer)
        return
    if command.startswith("commit ssl "):
        if not text.endswith("Success!"):
            raise RuntimeCommandError(command, answer)
        return
    if text.startswith(("Unknown command", "Permission denied")):
        raise RuntimeCommandError(command, answer)


@dataclass(frozen=True, slots=True)
class MasterCli:
    """The master process's CLI (master-worker mode, `-S <socket>`)."""

    path: str
    timeout: float = 60.0  # a reload waits for the new worker to parse the configuration and start

    def send(self, command: str) -> str:
        return _exchange(self.path, (_command_line(command) + "\n").encode(), self.timeout)

    def reload(self) -> None:
        """Start a new worker with the configuration on disk; the old one finishes its connections and exits.
        Raises RuntimeCommandError with HAProxy's startup messages when the new worker failed."""
        answer = self.send("reload")
        if "Success=1" not in answer:
            raise RuntimeCommandError("reload", answer)

    def show_proc(self) -> list[dict[str, str]]:
        """`show proc`: the master and workers, current and old (columns: pid, type, reloads, uptime, version)."""
        answer = self.send("show proc")
        out = []
        for line in answer.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            fields = line.split()
            # "<pid> <type> <reloads> <uptime> <version>", where the master's reloads read "0 [failed: 0]"
            if len(fields) >= 5 and fields[0].isdigit():
                out.append({"pid": fields[0], "type": fields[1], "reloads": " ".join(fields[2:-2]),
                            "uptime": fields[-2], "version": fields[-1]})
        return out

    def worker_pids(self) -> list[int]:
        """Every worker still alive: the current one first, then old ones finishing their connections."""
        return [int(p["pid"]) for p in self.show_proc() if p["type"] == "worker"]
