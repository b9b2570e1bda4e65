"""TLS for the agent's API and its calls to other agents, from the config's cluster PKI (agent/pki.py).

The server presents the host certificate and asks every client for one (optional at the handshake, so
operators and the management plane can call with the CA file and a token); a client certificate that is
presented must chain to the cluster CA, else the handshake fails. What the certificate says about its holder
(``client_certificate``: a host, by its name, or an operator) is read here; what each may call is decided in
``agent.api.access``. The client side (``client_context``) verifies the peer agent's certificate with the
cluster CA, hostname or IP included, and presents the host certificate.
"""

from __future__ import annotations

import enum
import logging
import ssl
from dataclasses import dataclass

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import AgentConfig, ConfigError
from agent.errors import Code, Unauthorized

log = logging.getLogger(__name__)


class ClusterCertificateRequired(Unauthorized):
    code = Code.CLUSTER_CERTIFICATE_REQUIRED


class CertificateKind(enum.StrEnum):
    """Who a client certificate of the cluster CA was issued to (``agent pki issue``)."""

    #: ``pki issue --host NAME``: serverAuth and clientAuth, its name in CN and SAN: a hypervisor.
    HOST = "host"
    #: ``pki issue --client NAME``: clientAuth only: an operator (virsh, the management plane).
    OPERATOR = "operator"


@dataclass(frozen=True)
class ClientCertificate:
    kind: CertificateKind
    name: str  # the subject's CN


def client_certificate(request: web.Request) -> ClientCertificate | None:
    """The client certificate of a TLS request (it chains to the cluster CA: the handshake checked it), or
    None over plain HTTP or without one. A host certificate is one with serverAuth whose CN is among its
    SAN names (as ``pki issue --host`` makes them); any other is an operator's."""
    transport = request.transport
    ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        san_names = {str(v) for v in sans.get_values_for_type(x509.DNSName)} | {
            str(v) for v in sans.get_values_for_type(x509.IPAddress)
        }
    except x509.ExtensionNotFound:
        san_names = set()
    if name and ExtendedKeyUsageOID.SERVER_AUTH in usages and name in san_names:
        return ClientCertificate(CertificateKind.HOST, name)
    return ClientCertificate(CertificateKind.OPERATOR, name)


def over_tls(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


def peer_address(request: web.Request) -> str:
    transport = request.transport
    peer = None if transport is None else transport.get_extra_info("peername")
    return str(peer[0]) if peer else "?"


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
