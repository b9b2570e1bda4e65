"""``agent.systemd``: the notify protocol on real datagram sockets, and the served agent's READY / WATCHDOG /
STOPPING sequence as systemd would receive it (a real process, libvirt's test driver)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_api_server import GRACE_S, write_config

from agent.systemd import Notifier


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"ksa-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    with sock:
        yield "@" + name, sock


def test_sends_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
        assert notifier.notify("READY=1", "STATUS=up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_sends_to_an_abstract_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    assert Notifier.from_environment({"NOTIFY_SOCKET": address}).notify("STOPPING=1")
    assert sock.recv(4096) == b"STOPPING=1"


def test_without_systemd_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and not notifier.notify("READY=1")
    assert not Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"}).enabled


def test_a_missing_socket_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not notifier.notify("READY=1")
    assert "cannot notify systemd" in caplog.text


def test_watchdog_is_ours_only_when_the_pid_matches() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environment(env).watchdog_usec == 30_000_000
    assert Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_usec == 30_000_000
    assert Notifier.from_environment({**env, "WATCHDOG_PID": "1"}).watchdog_usec is None
    assert Notifier.from_environment({**env, "WATCHDOG_USEC": "0"}).watchdog_usec is None
    assert Notifier.from_environment({**env, "WATCHDOG_USEC": "soon"}).watchdog_usec is None


def test_served_agent_notifies_ready_once_listening_then_pings_then_stopping(
    tmp_path: Path, unused_tcp_port: int, abstract_socket: tuple[str, socket.socket]
) -> None:
    address, sock = abstract_socket
    config = write_config(tmp_path, unused_tcp_port)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}  # a ping every 0.1 s
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from agent.api.server import run; run({str(config)!r})"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        messages = []
        while b"READY=1" not in messages[-1:] and len(messages) < 200:
            message = sock.recv(4096).split(b"\n")[0]
            if message == b"READY=1":
                # READY means listening: the port accepts a connection right now.
                socket.create_connection(("127.0.0.1", unused_tcp_port), timeout=2).close()
            messages.append(message)
        assert messages[-1] == b"READY=1", messages
        pings = 0
        while pings < 3:
            assert sock.recv(4096) == b"WATCHDOG=1"
            pings += 1
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while sock.recv(4096).split(b"\n")[0] != b"STOPPING=1":
            assert time.monotonic() < deadline
        output, _ = proc.communicate(timeout=GRACE_S * 3)
        assert proc.returncode == 0, output.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert set(messages[:-1]) <= {b"WATCHDOG=1"}  # nothing but pings before READY
