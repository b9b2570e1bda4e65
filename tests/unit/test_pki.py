"""agent/pki.py: the cluster CA, a host's files in the /etc/pki layout, an operator's client certificate."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent import pki
from agent.cli.main import main


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "cluster"
    pki.init_ca(directory, cluster="test cluster")
    return directory


def test_init_makes_a_ca_and_refuses_to_replace_it(ca_dir: Path) -> None:
    files = pki.CaFiles.of(ca_dir)
    ca = _cert(files.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    before = files.key.read_bytes()
    with pytest.raises(pki.PkiError, match="already holds a CA"):
        pki.init_ca(ca_dir)
    assert files.key.read_bytes() == before


def test_host_files_in_the_layouts_libvirt_and_qemu_read(ca_dir: Path, tmp_path: Path) -> None:
    host = pki.issue_host(ca_dir, "hostA", ["10.0.0.11", "hostA.example"], out=tmp_path / "etc-pki")
    root = tmp_path / "etc-pki"
    for relative, kind in host.files().items():
        mode = stat.S_IMODE((root / relative).stat().st_mode)
        assert mode == (0o600 if kind == "key" else 0o644), relative
    assert stat.S_IMODE((root / "libvirt" / "private").stat().st_mode) == 0o700
    assert (root / "qemu" / "server-cert.pem").read_bytes() == (
        root / "libvirt" / "clientcert.pem"
    ).read_bytes()
    assert (root / "qemu" / "ca-cert.pem").read_bytes() == pki.CaFiles.of(ca_dir).cert.read_bytes()
    cert = _cert(host.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hostA", "hostA.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.11")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    assert pki.subject_dn(host.cert) == "O=test cluster,CN=hostA" == pki.dn_for(ca_dir, "hostA")
    # The files make a working TLS pair: OpenSSL loads them and verifies the chain.
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(host.ca))
    server.load_cert_chain(host.cert, host.key)
    client = ssl.create_default_context(cafile=str(root / "qemu" / "ca-cert.pem"))
    client.load_cert_chain(root / "qemu" / "client-cert.pem", root / "qemu" / "client-key.pem")
    _handshake(server, client, "10.0.0.11")


def test_operator_certificate_is_client_only_in_pkipath_layout(ca_dir: Path) -> None:
    directory = pki.issue_client(ca_dir, "operator")
    assert sorted(p.name for p in directory.iterdir()) == ["cacert.pem", "clientcert.pem", "clientkey.pem"]
    eku = _cert(directory / "clientcert.pem").extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE((directory / "clientkey.pem").stat().st_mode) == 0o600


def test_a_certificate_of_another_ca_does_not_verify(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    stranger = pki.issue_host(other, "hostA", ["10.0.0.11"])
    ours = pki.issue_host(ca_dir, "hostB", ["10.0.0.12"], out=tmp_path / "b")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(stranger.cert, stranger.key)
    client = ssl.create_default_context(cafile=str(ours.ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, client, "10.0.0.11")


def test_cli_init_issue_and_dn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "c"
    assert main(["pki", "init", str(directory)]) == 0
    assert main(["pki", "issue", str(directory), "--host", "h1", "--address", "192.0.2.1"]) == 0
    assert main(["pki", "issue", str(directory), "--client", "ops"]) == 0
    assert main(["pki", "dn", str(directory / "hosts" / "h1" / "libvirt" / "servercert.pem")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"O={pki.DEFAULT_CLUSTER},CN=h1"
    assert main(["pki", "issue", str(directory), "--host", "h2"]) == 2  # an address is required
    assert main(["pki", "init", str(directory)]) == 2  # never replaces the CA
    assert "already holds a CA" in capsys.readouterr().err


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """One in-memory TLS handshake between the two contexts; raises what the client's side raises."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"c": False, "s": False}
    for _ in range(10):
        for side, obj in (("c", cli), ("s", srv)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_a_link_planted_at_the_temporary_name_gets_no_key(ca_dir: Path, tmp_path: Path) -> None:
    """The repro: ``pki._write`` opened ``*.tmp`` following a symlink another user planted there, so the new
    key landed in a file of theirs. Now the temporary file is made fresh (O_EXCL | O_NOFOLLOW), 0600."""
    out = tmp_path / "hv9"
    trap = tmp_path / "readable-by-all"
    trap.write_bytes(b"")
    trap.chmod(0o666)
    key = pki.HostPki(out).key
    key.parent.mkdir(parents=True)
    (key.parent / (key.name + ".tmp")).symlink_to(trap)
    issued = pki.issue_host(ca_dir, "hv9", ["10.0.0.9"], out=out)
    assert trap.read_bytes() == b""
    assert not issued.key.is_symlink() and b"PRIVATE KEY" in issued.key.read_bytes()
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
