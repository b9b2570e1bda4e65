"""Who calls, and what each caller may do: identities and per-route roles, decided here and nowhere else.

Identities (``identify``):
- the management plane: this agent's token (``token_file``), or a client certificate of the cluster CA
  issued to an operator (``pki issue --client``);
- a peer hypervisor: over TLS, its host certificate (``pki issue --host``), known by the certificate's name,
  with the cluster token as a second factor when one is configured; the cluster token alone opens nothing
  on an HTTPS agent. With ``insecure_transport`` there are no certificates: the cluster token identifies a
  peer (all peers share one name, ``cluster-token``), and so does this agent's own token (a source may be
  handed it as ``dstHost.token``), which the agent warns about at start;
- anything else is refused with 401.

Roles (``Role``), one per route (``agent.api.routes``): ``public`` (anyone), ``management``, ``peer``
(the agent-to-agent paths), ``dialect`` (a mounted dialect's paths, whose handlers apply their own rule:
the ZStack dialect's source networks). A known caller without the route's role gets 403. A peer's name is
what binds each incoming-migration record to the peer that prepared it (``agent.migration.incoming``).
"""

from __future__ import annotations

import enum
import hmac
import logging
from dataclasses import dataclass

from aiohttp import web

from agent.errors import Code, Forbidden, Unauthorized
from agent.security import (
    CertificateKind,
    ClusterCertificateRequired,
    client_certificate,
    over_tls,
    peer_address,
)

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    PUBLIC = "public"
    MANAGEMENT = "management"
    PEER = "peer"
    DIALECT = "dialect"


#: The peer name of every caller with the cluster token over plain HTTP (``insecure_transport``).
INSECURE_PEER = "cluster-token"


@dataclass(frozen=True)
class Caller:
    roles: frozenset[Role]
    #: For logs and record binding: ``token``, ``operator:NAME``, ``host:NAME`` or ``cluster-token``.
    name: str

    @property
    def peer_name(self) -> str:
        """The name an incoming-migration record is bound to."""
        return self.name


@dataclass(frozen=True)
class Tokens:
    management: str
    cluster: str | None


#: The identified caller of a request, for handlers that bind what it makes to it.
CALLER = web.RequestKey("caller", Caller)


def identify(request: web.Request, tokens: Tokens) -> Caller:
    """The caller of ``request``; raises ``Unauthorized`` when it proves no identity."""
    bearer = _bearer(request.headers.get("Authorization"))
    certificate = client_certificate(request)
    if certificate is not None and certificate.kind is CertificateKind.HOST:
        if bearer is None and tokens.cluster is not None:
            raise Unauthorized("agent-to-agent calls carry the cluster token (Authorization: Bearer)")
        if bearer is not None and not _matches(bearer, tokens.management, tokens.cluster):
            raise Unauthorized("wrong token")
        return Caller(frozenset({Role.PEER}), f"host:{certificate.name}")
    if certificate is not None:
        return Caller(frozenset({Role.MANAGEMENT}), f"operator:{certificate.name}")
    if bearer is None:
        raise Unauthorized("missing Authorization: Bearer <token>")
    roles: set[Role] = set()
    if _matches(bearer, tokens.management):
        roles.add(Role.MANAGEMENT)
    if tokens.cluster is not None and _matches(bearer, tokens.cluster):
        if over_tls(request):
            if not roles:
                log.warning(
                    "refused %s %s from %s: the cluster token without a host certificate",
                    request.method,
                    request.path,
                    peer_address(request),
                )
                raise ClusterCertificateRequired(
                    "the cluster token alone opens nothing on an HTTPS agent",
                    details="a peer agent presents its host certificate (tls_cert, tls_key in agent.toml)",
                )
        else:
            roles.add(Role.PEER)
            return Caller(frozenset(roles), INSECURE_PEER)
    if not roles:
        raise Unauthorized("wrong token")
    if not over_tls(request):
        # Plain HTTP: the destination's own token, handed to a source as dstHost.token, also makes a peer.
        roles.add(Role.PEER)
    return Caller(frozenset(roles), "token")


def authorize(request: web.Request, caller: Caller, role: Role) -> None:
    """Refuse a caller without ``role`` (logged: a refused call is worth a line): 401
    ``AGENT.CLUSTER_CERTIFICATE_REQUIRED`` on a peer path over TLS without any client certificate (as
    before roles), 403 for a known caller of another role."""
    if role in caller.roles:
        return
    if role is Role.PEER and over_tls(request) and client_certificate(request) is None:
        log.warning(
            "refused agent-to-agent call %s %s from %s: no client certificate from the cluster CA",
            request.method,
            request.path,
            peer_address(request),
        )
        raise ClusterCertificateRequired(
            "agent-to-agent calls need a client certificate from the cluster CA",
            details="the calling agent presents its host certificate (tls_cert, tls_key in agent.toml)",
        )
    log.warning(
        "refused %s %s from %s (%s): the path is for the %s role",
        request.method,
        request.path,
        peer_address(request),
        caller.name,
        role,
    )
    if role is Role.PEER:
        raise Forbidden(
            f"{request.path} is for peer agents; {caller.name} is not one",
            code=Code.CLUSTER_CERTIFICATE_REQUIRED,
            details="a peer agent presents its host certificate (pki issue --host)",
        )
    raise Forbidden(
        f"{request.path} is for the {role} role; {caller.name} has {', '.join(sorted(caller.roles))}",
        details="the management plane calls with the agent's token or an operator certificate; peer "
        "agents with their host certificate, on /v1/incoming-migrations only",
    )


def _bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("Authorization must be: Bearer <token>")
    return given.strip()


def _matches(given: str, *accepted: str | None) -> bool:
    """Constant time, every token compared."""
    presented = given.encode()
    results = [hmac.compare_digest(presented, token.encode()) for token in accepted if token is not None]
    return any(results)
