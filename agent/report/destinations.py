"""Where the agent may send reports: ``callbackUrl``, ``progressUrl`` and ZStack's callback URLs.

A report URL is an http(s) URL whose host resolves only to addresses in ``[report] allowed_networks`` or
to the address the request itself came from (the management plane that asked is where its answers go):
never a link-local metadata service, the host's own loopback or any other network the caller names. The
check runs when the request arrives (the name is resolved then); the POSTs follow no redirect and read at
most ``MAX_ANSWER_BYTES`` of an answer (``agent.report.outbox``, ``agent.report.progress``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence

from yarl import URL

from agent.errors import InvalidRequest

#: What is read of a management server's answer to a report (the status is what counts).
MAX_ANSWER_BYTES = 64 * 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


async def check_report_url(
    url: str, *, allowed: Sequence[Network], submitter: str | None, field: str
) -> None:
    """Raise ``InvalidRequest`` (naming ``field``) unless ``url`` may receive reports (module docstring)."""
    try:
        parsed = URL(url)
    except ValueError as err:
        raise InvalidRequest(f"{field} is not a URL: {err}", field=field) from err
    if parsed.scheme not in ("http", "https") or not parsed.host or parsed.user or parsed.password:
        raise InvalidRequest(f"{field} must be an http(s) URL without credentials", field=field)
    addresses = await _resolve(parsed.host, parsed.port or 80, field)
    origin = _address(submitter) if submitter else None
    for address in addresses:
        if address == origin or any(address in network for network in allowed):
            continue
        raise InvalidRequest(
            f"{field} {url} reaches {address}, which is neither in [report] allowed_networks nor the "
            "address this request came from",
            field=field,
            details="add the management plane's network to [report] allowed_networks in agent.toml",
        )


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def _resolve(host: str, port: int, field: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    literal = _address(host.strip("[]"))
    if literal is not None:
        return [literal]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise InvalidRequest(f"{field}: cannot resolve {host}: {err}", field=field) from err
    found = [a for info in infos if (a := _address(str(info[4][0]))) is not None]
    if not found:
        raise InvalidRequest(f"{field}: {host} resolves to no address", field=field)
    return found
