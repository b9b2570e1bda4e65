"""A packet capture for lab tests: run inside a lab host's network namespace (``nsenter --net=...``), read
every frame on every interface there with a raw AF_PACKET socket, and count frames holding each needle, until
SIGTERM; then print one JSON line: {"frames", "bytes", "drops", "hits": {needle: frames}, "tcpPorts": [...]}.

Standard library only (it runs under the test's interpreter). A needle cut by a frame boundary is not seen:
the tests look for needles that occur many times.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
from collections import Counter

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6


def tcp_ports(frame: bytes) -> tuple[int, int] | None:
    """(source, destination) port of an Ethernet/IPv4/TCP frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    start = 14 + ihl
    if len(frame) < start + 4:
        return None
    src, dst = struct.unpack("!HH", frame[start : start + 4])
    return src, dst


def main(needles: list[bytes]) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    sock.settimeout(0.5)
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    hits: Counter[str] = Counter()
    ports: Counter[int] = Counter()
    frames = size = 0
    print("ready", flush=True)
    while not stop:
        try:
            frame = sock.recv(1 << 18)
        except TimeoutError:
            continue
        frames += 1
        size += len(frame)
        pair = tcp_ports(frame)
        if pair is not None:
            ports[min(pair)] += len(frame)  # the service's port is the lower one here (QEMU, NBD, libvirtd)
        for needle in needles:
            if needle in frame:
                hits[needle.decode("latin-1")] += 1
    stats = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    _packets, drops = struct.unpack("II", stats)
    result = {
        "frames": frames,
        "bytes": size,
        "drops": drops,
        "hits": {n.decode("latin-1"): hits[n.decode("latin-1")] for n in needles},
        "tcpPorts": {str(p): b for p, b in ports.most_common(12)},
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main([arg.encode("latin-1") for arg in sys.argv[1:]])
