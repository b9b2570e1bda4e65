"""``agent.api.server.run`` as the service runs it: a real process on loopback with libvirt's in-process test
driver (``test:///default``), logging to stdout, and a graceful stop on SIGTERM within the grace period."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from service_fakes import STORAGE_A, TOKEN, make_config

from agent.api.server import setup_logging, ssl_context
from agent.config import ConfigError

GRACE_S = 2.0


def write_config(tmp_path: Path, port: int) -> Path:
    make_config(tmp_path)  # writes the token file and the roots
    text = f"""
listen_address = "127.0.0.1"
port = {port}
token_file = "{tmp_path / "token"}"
host_uuid = "6f1b7c1e-6a52-4e8e-9a8e-3c0d2b1f0a11"
libvirt_uri = "test:///default"
state_dir = "{tmp_path / "state"}"
shutdown_grace_s = {GRACE_S}
insecure_transport = true

[[storage]]
uuid = "{STORAGE_A}"
path = "{tmp_path / "rootA"}"
"""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def call(url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def test_serve_answers_and_stops_on_sigterm(tmp_path: Path, unused_tcp_port: int) -> None:
    config = write_config(tmp_path, unused_tcp_port)
    base = f"http://127.0.0.1:{unused_tcp_port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from agent.api.server import run; run({str(config)!r})"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, health = call(f"{base}/v1/health")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.communicate()[0].decode()
                assert time.monotonic() < deadline, "the agent did not come up"
                time.sleep(0.1)
        assert status == 200 and health["status"] == "ok"
        assert call(f"{base}/v1/vms")[0] == 401
        status, vms = call(f"{base}/v1/vms", TOKEN)
        assert status == 200 and vms["vms"], vms  # the test driver's one domain
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=GRACE_S * 3)
        assert proc.returncode == 0
        assert time.monotonic() - started < GRACE_S
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = output.decode()
    assert "kvm-storage-agent starting" in log and "kvm-storage-agent stopped" in log
    assert "WARNING agent.api.server: insecure_transport = true: plain HTTP" in log
    assert TOKEN not in log
    assert not (tmp_path / "state" / "journal.sqlite-wal").exists()  # the journal was closed cleanly


def test_bad_log_level_and_tls_halves_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_level"):
        setup_logging("chatty")
    (tmp_path / "cert.pem").write_text("")
    config = make_config(tmp_path, tls_cert=str(tmp_path / "cert.pem"))
    with pytest.raises(ConfigError, match="tls_key: missing"):
        ssl_context(config)
    with pytest.raises(ConfigError, match=r"tls_cert: missing.*insecure_transport = true"):
        ssl_context(make_config(tmp_path))
    assert ssl_context(make_config(tmp_path, insecure_transport=True)) is None
    config = make_config(tmp_path, tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "key.pem"))
    with pytest.raises(ConfigError, match="tls_cert"):
        ssl_context(config)
