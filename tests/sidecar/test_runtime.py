"""The runtime API client against a fake HAProxy socket that answers as HAProxy 2.8 does (answers copied from the
real one): how each command's answer is judged, and how `show stat` and `show proc` are read."""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.runtime import MasterCli, RuntimeApi, RuntimeCommandError, RuntimeUnavailable

ANSWERS = {
    "set server b/s addr 10.0.0.1 port 80": "IP changed from '127.0.0.1' to '10.0.0.1' by 'stats socket command'\n\n",
    "set server b/s addr 10.0.0.1 port 81": "no need to change the addr, port changed from '80' to '81'\n\n",
    "set server b/x state ready": "No such server.\n\n",
    "set server b/s state ready": "\n",
    "add map /run/m.map k v": "Unknown map identifier. Please use #<id> or <file>.\n\n",
    "del map /run/good.map k": "\n",
    "show stat": "# pxname,svname,status,weight\noutbound,FRONTEND,OPEN,\nhttp:shop.api:80,api.shop-1,UP,1\n\n",
    "show proc": ("#<PID>          <type>          <reloads>       <uptime>        <version>      \n"
                  "5476            master          1 [failed: 0]   0d00h00m03s     2.8.25-5cf5d0683\n"
                  "# workers\n5543            worker          0               0d00h00m01s     2.8.25-5cf5d0683\n"
                  "# old workers\n5479            worker          1               0d00h00m03s     2.8.25-5cf5d0683\n"
                  "# programs\n\n"),
    "reload": "Success=0\n--\n[ALERT] (1) : config : parsing [h.cfg:3] : unknown keyword 'x'\n",
    "set ssl cert /run/svid.pem <<": "transaction created for certificate /run/svid.pem!\n",
    "commit ssl cert /run/svid.pem": "Committing /run/svid.pem.\nFailed!\nunable to load the key\n",
    "abort ssl cert /run/svid.pem": "Transaction aborted for certificate '/run/svid.pem'!\n",
}


@pytest.fixture
def fake() -> Iterator[tuple[str, list[str]]]:
    """A unix socket answering ANSWERS by the first line received; yields its path and the commands it got."""
    directory = tempfile.mkdtemp(prefix="mlr-", dir="/tmp")
    path = str(Path(directory) / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(0.2)
    got: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                first = data.decode().split("\n", 1)[0]
                got.append(first)
                conn.sendall(ANSWERS.get(first, "Unknown command: '" + first + "'\n").encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, got
    stop.set()
    thread.join(timeout=5)
    server.close()
    Path(path).unlink(missing_ok=True)
    Path(directory).rmdir()


def test_a_changed_address_or_port_is_success_and_a_missing_server_an_error_naming_the_command(
        fake: tuple[str, list[str]]) -> None:
    api = RuntimeApi(fake[0])
    api.set_server_address("b", "s", "10.0.0.1", 80)
    api.set_server_address("b", "s", "10.0.0.1", 81)
    api.set_server_state("b", "s", "ready")
    with pytest.raises(RuntimeCommandError, match=r"`set server b/x state ready` failed: No such server\."):
        api.set_server_state("b", "x", "ready")
    with pytest.raises(RuntimeCommandError, match="Unknown map identifier"):
        api.add_map("/run/m.map", "k", "v")
    api.del_map("/run/good.map", "k")


def test_show_stat_is_read_by_column_name(fake: tuple[str, list[str]]) -> None:
    rows = RuntimeApi(fake[0]).show_stat()
    assert rows[1] == {"pxname": "http:shop.api:80", "svname": "api.shop-1", "status": "UP", "weight": "1"}


def test_show_proc_lists_the_current_worker_first_then_old_ones(fake: tuple[str, list[str]]) -> None:
    master = MasterCli(fake[0])
    assert master.worker_pids() == [5543, 5479]
    assert master.show_proc()[0] == {"pid": "5476", "type": "master", "reloads": "1 [failed: 0]",
                                     "uptime": "0d00h00m03s", "version": "2.8.25-5cf5d0683"}


def test_a_failed_reload_is_an_error_quoting_haproxys_startup_messages(fake: tuple[str, list[str]]) -> None:
    with pytest.raises(RuntimeCommandError, match="unknown keyword 'x'"):
        MasterCli(fake[0]).reload()


def test_a_failed_certificate_commit_is_aborted_and_the_error_names_the_command_not_the_key(
        fake: tuple[str, list[str]]) -> None:
    secret = "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----"
    with pytest.raises(RuntimeCommandError) as caught:
        RuntimeApi(fake[0]).update_certificate("/run/svid.pem", secret)
    assert "commit ssl cert /run/svid.pem" in str(caught.value) and "secret" not in str(caught.value)
    assert fake[1] == ["set ssl cert /run/svid.pem <<", "commit ssl cert /run/svid.pem",
                       "abort ssl cert /run/svid.pem"]


def test_a_payload_with_an_empty_line_is_refused_before_it_is_sent(fake: tuple[str, list[str]]) -> None:
    with pytest.raises(ValueError, match="empty line"):
        RuntimeApi(fake[0]).send("set ssl cert /run/svid.pem", "a\n\nb")
    assert fake[1] == []


def test_a_socket_nobody_listens_on_is_unavailable_not_a_command_error() -> None:
    with pytest.raises(RuntimeUnavailable, match="/nonexistent/haproxy.sock"):
        RuntimeApi("/nonexistent/haproxy.sock").show_info()
