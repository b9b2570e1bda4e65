"""The holder: one small process per lab host that keeps the host's namespaces and reaps its children.

It runs inside the host's network, mount and UTS namespaces (started as
``ip netns exec HOST unshare --mount --uts --propagation private -- python3 -m labkit.holder HOST SOCKET``),
so everything it spawns (virtlogd, libvirtd, the agent) lands in those namespaces without nsenter.
It is a child subreaper: QEMU processes that libvirtd daemonizes, and daemons that die, are re-parented to it
and reaped here. Without it they would stay zombies, because PID 1 on the lab machines does not reap orphans.

Protocol: one JSON line in, one JSON line out, on a root-only Unix socket.
``{"op": "ping"}`` -> ``{"ok": true, "pid": N, "host": NAME}``;
``{"op": "spawn", "argv": [...], "log": PATH, "env": {...}}`` -> ``{"ok": true, "pid": N}``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

PR_SET_CHILD_SUBREAPER = 36
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


# --- inside the namespaces -------------------------------------------------------------------------------


def _reap_forever() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.5)
            continue
        # The lab reports "exited" for a daemon that died at start: this line says how (code or signal).
        if os.WIFSIGNALED(status):
            print(f"holder: pid {pid} killed by signal {os.WTERMSIG(status)}", flush=True)
        else:
            print(f"holder: pid {pid} exited with status {os.waitstatus_to_exitcode(status)}", flush=True)


def _spawn(argv: list[str], log_path: str, env: dict[str, str]) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log_path, flags, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across exec, so reset them.
    return os.posix_spawnp(
        argv[0],
        argv,
        {**BASE_ENV, **env},
        file_actions=actions,
        setsid=True,
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


class _Handler(socketserver.StreamRequestHandler):
    host_name = ""

    def handle(self) -> None:
        try:
            request = json.loads(self.rfile.readline())
            reply = self._dispatch(request)
        except Exception as err:  # the holder must outlive any bad request
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")

    def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "ping":
            return {"ok": True, "pid": os.getpid(), "host": self.host_name}
        if request.get("op") == "spawn":
            pid = _spawn(list(request["argv"]), str(request["log"]), dict(request.get("env") or {}))
            return {"ok": True, "pid": pid}
        return {"ok": False, "error": f"unknown op {request.get('op')!r}"}


def serve(host_name: str, socket_path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=_reap_forever, name="reaper", daemon=True).start()
    Path(socket_path).unlink(missing_ok=True)
    _Handler.host_name = host_name
    old_umask = os.umask(0o077)
    server = socketserver.UnixStreamServer(socket_path, _Handler)
    os.umask(old_umask)
    print(f"holder for {host_name} ready, pid {os.getpid()}", flush=True)
    server.serve_forever()


# --- from the root namespace ---------------------------------------------------------------------------


def request(socket_path: Path, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def ping(socket_path: Path) -> int | None:
    """The holder's pid if it answers, else None."""
    try:
        reply = request(socket_path, {"op": "ping"}, timeout=2.0)
    except (OSError, ValueError):
        return None
    pid = reply.get("pid")
    return pid if reply.get("ok") and isinstance(pid, int) else None


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
