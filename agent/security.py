"""TLS for the agent's API and its calls to other agents, from the config's cluster PKI (agent/pki.py).

The server presents the host certificate and asks every client for one (optional at the handshake, so
operators and the management plane can call with the CA file and a token); a client certificate that is
presented must chain to the cluster CA, else the handshake fails. Agent-to-agent endpoints then also need
one (``require_cluster_certificate``). The client side (``client_context``) verifies the peer agent's
certificate with the cluster CA, hostname or IP included, and presents the host certificate.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from aiohttp import web

from agent.config import AgentConfig, ConfigError
from agent.errors import Code, Unauthorized

log = logging.getLogger(__name__)

#: Paths only other agents call: they need a client certificate from the cluster CA over TLS.
AGENT_TO_AGENT_PREFIX = "/v1/incoming-migrations"


class ClusterCertificateRequired(Unauthorized):
    code = Code.CLUSTER_CERTIFICATE_REQUIRED


def server_context(config: AgentConfig) -> ssl.SSLContext | None:
    """The HTTPS server's context, or None for plain HTTP (only with ``insecure_transport``)."""
    config.check_transport()
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"tls_cert/tls_key: cannot load {config.tls_cert}: {err}") from err
    if config.tls_ca is not None:
        try:
            context.load_verify_locations(cafile=str(config.tls_ca))
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"tls_ca: cannot load {config.tls_ca}: {err}") from err
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(config: AgentConfig) -> ssl.SSLContext | None:
    """For calls to other agents: verify them with the cluster CA and present this host's certificate.
    None without a CA (only with ``insecure_transport``, ``check_transport`` sees to it at start): the
    system's CAs then verify an https peer."""
    if config.tls_ca is None:
        return None
    context = ssl.create_default_context(cafile=str(config.tls_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_cert is not None and config.tls_key is not None:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def require_cluster_certificate(request: web.Request) -> None:
    """Refuse an agent-to-agent call over TLS that came without a client certificate of the cluster CA
    (a certificate from another CA never gets this far: the handshake fails). Over plain HTTP (only
    served with ``insecure_transport``) the token alone decides, as before."""
    if not request.path.startswith(AGENT_TO_AGENT_PREFIX):
        return
    transport = request.transport
    if transport is None or transport.get_extra_info("ssl_object") is None:
        return
    peercert: dict[str, Any] | None = transport.get_extra_info("peercert")
    if not peercert:
        peer = transport.get_extra_info("peername")
        log.warning(
            "refused agent-to-agent call %s %s from %s: no client certificate from the cluster CA",
            request.method,
            request.path,
            peer[0] if peer else "?",
        )
        raise ClusterCertificateRequired(
            "agent-to-agent calls need a client certificate from the cluster CA",
            details="the calling agent presents its host certificate (tls_cert, tls_key in agent.toml)",
        )
