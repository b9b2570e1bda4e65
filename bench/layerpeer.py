"""One side of a cross-host layer copy, run inside a lab host's network namespace by case 3
(`ip netns exec hostB python -m bench.layerpeer export ...`), so the NBD traffic crosses the lab link.

- ``export PATH VIRTUAL_SIZE LISTEN_HOST [--plain]``: the transfer service's destination side
  (``agent.transfer.export.IncomingLayer``): prints its endpoint as one JSON line (secrets included: it goes
  to the parent through a pipe, never to a log), then waits for ``finish`` or ``abort`` on stdin.
- ``send METHOD SRC``: reads that endpoint from stdin and copies SRC into it, with the transfer service
  (``agent.transfer.send.send_layer_to``) or with ``qemu-img convert -n``; prints ``{"seconds": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from agent.transfer.endpoint import PSK_IDENTITY, NbdEndpoint
from agent.transfer.export import IncomingLayer
from agent.transfer.send import send_layer_to


async def _export(path: str, virtual_size: int, listen_host: str, tls: bool) -> int:
    layer = await IncomingLayer.prepare(path, "qcow2", virtual_size, listen_host=listen_host, tls=tls)
    finished = False
    try:
        print(json.dumps(layer.endpoint.to_dict()), flush=True)
        command = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if command == "finish":
            await layer.finish()
            finished = True
            print(json.dumps({"finished": True}), flush=True)
            return 0
        return 1
    finally:
        if not finished:  # abort() after finish() would remove the finished file too
            await layer.abort()


async def _convert(src: str, endpoint: NbdEndpoint) -> None:
    target = (
        f"driver=nbd,server.type=inet,server.host={endpoint.host},server.port={endpoint.port},"
        f"export={endpoint.export_name}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-psk-") as keydir:
        args = ["qemu-img", "convert", "-n", "-f", "qcow2"]
        if endpoint.psk:
            (Path(keydir) / "keys.psk").write_text(f"{PSK_IDENTITY}:{endpoint.psk}\n")
            args += [
                "--object",
                f"tls-creds-psk,id=tls0,endpoint=client,dir={keydir},username={PSK_IDENTITY}",
            ]
            target += ",tls-creds=tls0"
        proc = await asyncio.create_subprocess_exec(
            *args, "--target-image-opts", src, target, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"qemu-img convert failed: {err.decode(errors='replace').strip()}")


async def _send(method: str, src: str) -> int:
    endpoint = NbdEndpoint.from_dict(json.loads(sys.stdin.readline()))
    started = time.monotonic()
    if method == "transfer":
        await send_layer_to(src, "qcow2", endpoint, rate=lambda: None)
    else:
        await _convert(src, endpoint)
    print(json.dumps({"seconds": time.monotonic() - started}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layerpeer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("path")
    p.add_argument("virtual_size", type=int)
    p.add_argument("listen_host")
    p.add_argument("--plain", action="store_true", help="plain NBD instead of TLS-PSK")
    p = sub.add_parser("send")
    p.add_argument("method", choices=("transfer", "convert"))
    p.add_argument("src")
    args = parser.parse_args(argv)
    if args.command == "export":
        return asyncio.run(_export(args.path, args.virtual_size, args.listen_host, not args.plain))
    return asyncio.run(_send(args.method, args.src))


if __name__ == "__main__":
    sys.exit(main())
