"""The deployment's TLS material on disk: a kept CA, a SuperLink certificate re-signed
when the names it must carry change, private keys readable by their owner only."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from deploy.errors import DeployError
from deploy.tls import TlsFiles, make_certificates
from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def names_in(files: TlsFiles) -> set[str]:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in sans}


def assert_signed_by_ca(files: TlsFiles) -> None:
    """The chain a SuperNode checks: ca.crt -> superlink.crt, for every name in it."""
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier
    for name in names_in(files):
        try:
            subject = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            subject = x509.DNSName(name)
        verifier(subject).verify(cert, [])


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_new_name_re_signs_the_superlink_certificate_with_the_same_ca(tmp_path):
    files = make_certificates(tmp_path, ["superlink", "gpu-a"])
    ca, ca_key, old_key = files.ca_cert.read_bytes(), files.ca_key.read_bytes(), files.key.read_bytes()
    make_certificates(tmp_path, ["superlink", "gpu-a", "gpu-b", "10.0.0.5"])
    assert names_in(files) == {"superlink", "gpu-a", "gpu-b", "10.0.0.5", "localhost", "127.0.0.1"}
    assert files.ca_cert.read_bytes() == ca and files.ca_key.read_bytes() == ca_key
    assert files.key.read_bytes() != old_key
    assert_signed_by_ca(files)


def test_nothing_changed_leaves_every_byte(tmp_path):
    make_certificates(tmp_path, ["superlink", "gpu-a", "10.0.0.5"])
    before = snapshot(tmp_path)
    make_certificates(tmp_path, ["10.0.0.5", "superlink"])  # fewer names: still all in the certificate
    make_certificates(tmp_path, ["superlink", "gpu-a", "10.0.0.5"])
    assert snapshot(tmp_path) == before
    assert sorted(before) == ["ca.crt", "ca.key", "superlink.crt", "superlink.key"]


def test_private_keys_are_0600(tmp_path):
    files = make_certificates(tmp_path, ["superlink"])
    make_certificates(tmp_path, ["superlink", "gpu-b"])  # re-signed: the replaced key too
    for key in (files.ca_key, files.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key.name


def test_a_folder_without_the_ca_key_cannot_gain_a_name(tmp_path, reliability):
    """What the code before ca.key was kept left behind: keeping its certificate would fail
    the new host's TLS check later and far from here, so it stops now with one line."""
    files = make_certificates(tmp_path, ["superlink"])
    files.ca_key.unlink()
    make_certificates(tmp_path, ["superlink"])  # no new name: nothing to sign, nothing to say
    with pytest.raises(DeployError) as raised:
        make_certificates(tmp_path, ["superlink", "gpu-b"])
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path}: the SuperLink certificate must name gpu-b, but there is no ca.key")
    assert "remove the folder" in message
    reliability.record(
        "bad input",
        "a certificates folder without ca.key (made before it was kept) and a new SuperLink name",
        f"refused: {message}",
    )


def test_setup_host_re_issues_for_a_new_host_and_keeps_the_ca_key_root_only(tmp_path):
    """The compose `setup` step, as root runs it: the folder goes to the images' user, but
    the CA key, which only this step uses, stays root's."""
    certs = tmp_path / "certs"

    def setup(*names: str) -> subprocess.CompletedProcess:
        argv = ["setup-host", "--results", str(tmp_path / "results"), "--certs", str(certs)]
        argv += ["--keys", str(tmp_path / "keys")]
        argv += [a for name in names for a in ("--name", name)]
        return subprocess.run(
            [sys.executable, "-m", "deploy", "--app", str(ROOT), *argv], capture_output=True, text=True
        )

    assert setup("superlink", "gpu-a").returncode == 0
    assert setup("superlink", "gpu-a", "gpu-b").returncode == 0
    files = TlsFiles.in_folder(certs)
    assert {"gpu-a", "gpu-b"} <= names_in(files)
    assert_signed_by_ca(files)
    if os.geteuid() == 0:
        assert (files.ca_key.stat().st_uid, files.cert.stat().st_uid) == (0, 1000)
    files.ca_key.unlink()
    refused = setup("superlink", "gpu-a", "gpu-b", "gpu-c")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"error: {certs}: the SuperLink certificate must name gpu-c")
