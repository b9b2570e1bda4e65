"""The cluster's one trust root: a CA, and per host one key and certificate for every TLS end on that host.

``kvm-storage-agent pki init DIR`` makes the CA (``DIR/ca/cacert.pem``, ``DIR/ca/cakey.pem``).
``kvm-storage-agent pki issue DIR --host NAME --address ADDR...`` makes a host's key and certificate (SANs for
the name and every address; serverAuth and clientAuth) and lays them out as ``/etc/pki`` wants them, under
``DIR/hosts/NAME/`` (or ``--out``), so that one copy serves every user of TLS on the host:

- libvirtd as server and as client (peer-to-peer migration): ``CA/cacert.pem``, ``libvirt/servercert.pem``,
  ``libvirt/private/serverkey.pem``, ``libvirt/clientcert.pem``, ``libvirt/private/clientkey.pem``;
- QEMU's migration and NBD streams (qemu.conf ``default_tls_x509_cert_dir``): ``qemu/ca-cert.pem``,
  ``qemu/server-cert.pem``, ``qemu/server-key.pem``, ``qemu/client-cert.pem``, ``qemu/client-key.pem``;
- the agent's HTTPS server and its client to other agents: the libvirt files (agent.toml ``tls_cert``,
  ``tls_key``, ``tls_ca``).

``pki issue DIR --client NAME`` makes an operator's client-only certificate in libvirt's ``pkipath`` layout
(``cacert.pem``, ``clientcert.pem``, ``clientkey.pem``) for ``virsh -c qemu+tls://HOST/system?pkipath=DIR``.
Keys are written 0600. Server and client files of a host hold the same key and certificate.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_BITS = 3072
CA_DAYS = 3650
HOST_DAYS = 825
DEFAULT_CLUSTER = "kvm-storage-agent cluster"


class PkiError(Exception):
    """A PKI directory is missing, incomplete, or would be overwritten; the message names the path."""


class CaFiles(NamedTuple):
    """The cluster CA's certificate and key in a PKI directory (``CaFiles.of(directory)``)."""

    dir: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, directory: Path) -> CaFiles:
        return cls(directory, directory / "ca" / "cacert.pem", directory / "ca" / "cakey.pem")


@dataclass(frozen=True)
class HostPki:
    """A host's files in the ``/etc/pki`` layout under ``root`` (``/etc/pki`` itself once installed)."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "CA" / "cacert.pem"

    @property
    def cert(self) -> Path:
        return self.root / "libvirt" / "servercert.pem"

    @property
    def key(self) -> Path:
        return self.root / "libvirt" / "private" / "serverkey.pem"

    def files(self) -> dict[str, str]:
        """Relative path -> what it holds ("ca", "cert" or "key")."""
        return {
            "CA/cacert.pem": "ca",
            "libvirt/servercert.pem": "cert",
            "libvirt/private/serverkey.pem": "key",
            "libvirt/clientcert.pem": "cert",
            "libvirt/private/clientkey.pem": "key",
            "qemu/ca-cert.pem": "ca",
            "qemu/server-cert.pem": "cert",
            "qemu/server-key.pem": "key",
            "qemu/client-cert.pem": "cert",
            "qemu/client-key.pem": "key",
        }


CLIENT_FILES = {"cacert.pem": "ca", "clientcert.pem": "cert", "clientkey.pem": "key"}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> rsa.RSAPrivateKey:
    # RSA: libvirt (virnettlscontext.c) checks a certificate's key usage for digitalSignature and
    # keyEncipherment, and keyEncipherment only means something for an RSA key.
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole, with ``mode`` from its first byte: a fresh temporary file (never one that was
    there, nor a link someone placed: ``O_EXCL | O_NOFOLLOW``), renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by an interrupted run: ours to replace, never to write through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # the umask may have taken bits away; never more than mode
        handle.write(data)
    os.replace(tmp, path)


def init_ca(directory: Path, cluster: str = DEFAULT_CLUSTER, days: int = CA_DAYS) -> CaFiles:
    """Make the cluster CA in ``directory``; refuses to replace one (every host's trust hangs on it)."""
    files = CaFiles.of(directory)
    if files.cert.exists() or files.key.exists():
        raise PkiError(f"{files.cert.parent} already holds a CA; not replacing it")
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} CA"),
        ]
    )
    cert = (
        _certificate(name, name, key, days, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    key: rsa.RSAPrivateKey,
    days: int,
    *,
    ca: bool,
    until: datetime.datetime | None = None,
) -> x509.CertificateBuilder:
    """What the CA and a host certificate share: names, key, serial, validity (from 5 minutes ago, for clocks
    a little behind; never past ``until``), and the constraints and key usage of a CA or of a host."""
    now = _now()
    not_after = now + datetime.timedelta(days=days)
    if until is not None:
        not_after = min(not_after, until)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def load_ca(directory: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    files = CaFiles.of(directory)
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except OSError as err:
        raise PkiError(
            f"{directory}: no cluster CA ({err.filename}: {err.strerror}); run `pki init`"
        ) from err
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PkiError(f"{files.key}: not an RSA key")
    return cert, key


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for value in names:
        if value in seen:
            continue
        seen.add(value)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            entries.append(x509.DNSName(value))
    return x509.SubjectAlternativeName(entries)


def _issue(
    directory: Path, name: str, sans: Sequence[str], *, server: bool, days: int
) -> tuple[bytes, bytes, bytes]:
    """(CA cert, certificate, key) as PEM, signed by the CA in ``directory``."""
    if not name or "," in name or "=" in name:
        raise PkiError(f"{name!r} is not a usable certificate name")
    ca_cert, ca_key = load_ca(directory)
    key = _new_key()
    cluster = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(cluster[0].value))] if cluster else []
    subject = x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        _certificate(subject, ca_cert.subject, key, days, ca=False, until=ca_cert.not_valid_after_utc)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(_san(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    return ca_cert.public_bytes(pem), cert.public_bytes(pem), _key_pem(key)


def _lay_out(out: Path, layout: dict[str, str], material: tuple[bytes, bytes, bytes]) -> None:
    ca, cert, key = material
    data = {"ca": ca, "cert": cert, "key": key}
    for relative, kind in layout.items():
        _write(out / relative, data[kind], 0o600 if kind == "key" else 0o644)
    for private in {(out / r).parent for r, k in layout.items() if k == "key" and "private" in r}:
        os.chmod(private, 0o700)


def issue_host(
    directory: Path, host: str, addresses: Sequence[str], out: Path | None = None, days: int = HOST_DAYS
) -> HostPki:
    """A host's key and certificate (SANs: ``host`` and ``addresses``), laid out as ``/etc/pki`` under
    ``out`` (default ``directory/hosts/host``). Issuing again replaces them (rotation)."""
    target = HostPki(out or directory / "hosts" / host)
    material = _issue(directory, host, [host, *addresses], server=True, days=days)
    _lay_out(target.root, target.files(), material)
    return target


def issue_client(directory: Path, name: str, out: Path | None = None, days: int = HOST_DAYS) -> Path:
    """An operator's client-only certificate in libvirt's ``pkipath`` layout (default
    ``directory/clients/name``); returns that directory."""
    target = out or directory / "clients" / name
    _lay_out(target, CLIENT_FILES, _issue(directory, name, [], server=False, days=days))
    return target


def _gnutls_dn(name: x509.Name) -> str:
    # libvirt matches tls_allowed_dn_list against gnutls_x509_crt_get_dn(), which keeps the certificate's
    # order ("O=...,CN=host"; GnuTLS 3.7, libvirt 9.0), not RFC 4514's reversed one.
    return ",".join(attr.rfc4514_string() for attr in name)


def subject_dn(cert_file: Path) -> str:
    """The certificate's subject as libvirt's ``tls_allowed_dn_list`` matches it ("O=...,CN=hostA")."""
    return _gnutls_dn(x509.load_pem_x509_certificate(cert_file.read_bytes()).subject)


def dn_for(directory: Path, name: str) -> str:
    """The DN a certificate issued by the CA in ``directory`` for ``name`` carries (for allow lists)."""
    ca_cert, _ = load_ca(directory)
    cluster = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(cluster[0].value))] if cluster else []
    return _gnutls_dn(x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, name)]))
