"""TLS material for a deployment: a private CA and a SuperLink certificate it signs.

Also one key pair per SuperNode for Flower's node authentication.

The SuperLink's certificate must name every address it is reached by: its service name
inside compose, the machine's name for other hosts and for `flwr` on the host, and
127.0.0.1 (Flower's SuperExec connects back to it locally). Keys never leave the
deployment folder, which is git-ignored and never part of an image.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> "TlsFiles":
        return cls(folder / "ca.crt", folder / "superlink.crt", folder / "superlink.key")

    def exist(self) -> bool:
        return self.ca_cert.is_file() and self.cert.is_file() and self.key.is_file()


def make_certificates(folder: Path, names: Iterable[str]) -> TlsFiles:
    """Idempotent: an existing set is kept, so nodes already trusting the CA keep working."""
    files = TlsFiles.in_folder(folder)
    if files.exist():
        return files
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowertune-deploy CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans = [_san(n) for n in dict.fromkeys([*names, "localhost", "127.0.0.1"])]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return files


def make_superexec_secret(folder: Path) -> Path:
    """The shared secret a SuperExec must present to the SuperLink's Runtime API.

    With `--isolation process` that API listens on the SuperLink's public port; without
    the secret, anyone holding the CA certificate could pull the ServerApp's tasks.
    """
    path = folder / "superexec.secret"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _write_private(path, secrets.token_hex(32).encode())
    return path


def make_node_keys(folder: Path, names: Iterable[str]) -> dict[str, Path]:
    """One EC P-384 key pair per SuperNode (OpenSSH format, as Flower reads them).

    The SuperLink admits only nodes whose public key was registered with it, so a
    machine that merely reaches port 8000 cannot join the federation. Existing keys are
    kept: their registration on the SuperLink stays valid.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys = {}
    for name in names:
        private, public = folder / f"{name}.key", folder / f"{name}.pub"
        if not (private.is_file() and public.is_file()):
            key = ec.generate_private_key(ec.SECP384R1())
            _write_private(
                private,
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
            )
            public.write_bytes(
                key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            )
        keys[name] = public
    return keys


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 before any byte is written, so a secret is never readable by others."""
    path.touch(mode=0o600)
    path.write_bytes(data)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
