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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app.durable import write_durably
from deploy.errors import DeployError

VALIDITY = datetime.timedelta(days=365)
SUPEREXEC_SECRET = "superexec.secret"
CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowertune-deploy CA")])


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        return cls(folder / "ca.crt", folder / "ca.key", folder / "superlink.crt", folder / "superlink.key")

    def exist(self) -> bool:
        return self.ca_cert.is_file() and self.cert.is_file() and self.key.is_file()


def make_certificates(folder: Path, names: Iterable[str]) -> TlsFiles:
    """Keeps the CA, so nodes already trusting it keep working, and re-signs the SuperLink
    certificate with it when `names` (hosts, `--superlink-address`) gained one it lacks.

    A set that already names everything is left as it is, byte for byte.
    """
    files = TlsFiles.in_folder(folder)
    wanted = dict.fromkeys(_san(n) for n in [*names, "localhost", "127.0.0.1"])
    have = _names_in(files.cert) if files.exist() else []
    missing = [n for n in wanted if n not in have]
    if not missing:
        return files
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _load_ca(files, missing) if files.ca_cert.is_file() else _new_ca(files)
    _issue_superlink_certificate(files, ca, ca_key, list(wanted))
    return files


def _names_in(cert_path: Path) -> list[x509.GeneralName]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def _new_ca(files: TlsFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA key is kept (0600) beside its certificate: the only way to add a name later
    without handing every SuperNode host and `flwr` user a new ca.crt."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(CA_NAME)
        .issuer_name(CA_NAME)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_durably(files.ca_key, _private_pem(ca_key, serialization.PrivateFormat.PKCS8), mode=0o600)
    write_durably(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    return ca, ca_key


def _load_ca(files: TlsFiles, missing: list[x509.GeneralName]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A folder made before ca.key was kept cannot gain a name: say so rather than keep a
    certificate that fails the new host's TLS check, or silently replace the CA."""
    lacking = ", ".join(str(n.value) for n in missing)
    if not files.ca_key.is_file():
        raise DeployError(
            f"{files.ca_cert.parent}: the SuperLink certificate must name {lacking}, but there is no "
            "ca.key to sign one (the folder predates it); remove the folder to make a new CA, "
            "then copy the new ca.crt to every SuperNode host and `flwr` user"
        )
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    if ca_key.public_key() != ca.public_key():
        raise DeployError(
            f"{files.ca_key}: not the key of {files.ca_cert}; restore the matching pair or remove the folder"
        )
    return ca, ca_key


def _issue_superlink_certificate(
    files: TlsFiles, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[x509.GeneralName]
) -> None:
    """A fresh key with every certificate; the key is written first, so a crash in between
    leaves a certificate that lacks the names and is re-issued on the next run."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(min(now + VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_durably(files.key, _private_pem(key, serialization.PrivateFormat.PKCS8), mode=0o600)
    write_durably(files.cert, cert.public_bytes(serialization.Encoding.PEM))


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """The strict X.509 profile (Python 3.13's default TLS context, cryptography's verifier)
    wants key usages and key identifiers that lenient checks let a certificate go without."""
    usages = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{usage: allowed.get(usage, False) for usage in usages})


def make_superexec_secret(folder: Path) -> Path:
    """The shared secret a SuperExec must present to the SuperLink's Runtime API.

    With `--isolation process` that API listens on the SuperLink's public port; without
    the secret, anyone holding the CA certificate could pull the ServerApp's tasks.
    """
    path = folder / SUPEREXEC_SECRET
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_durably(path, secrets.token_hex(32).encode(), mode=0o600)
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
            write_durably(private, _private_pem(key, serialization.PrivateFormat.OpenSSH), mode=0o600)
            write_durably(
                public,
                key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
            )
        keys[name] = public
    return keys


def make_tls_material(certs: Path, keys: Path, names: Iterable[str], nodes: Iterable[str]) -> TlsFiles:
    """The CA, the SuperLink certificate naming `names`, the SuperExec secret and a key pair
    per node in `nodes`, each made only where missing. Compose's `setup` step and `deploy kit`
    both call this, so a kit carries exactly what a one-host stack would have made."""
    files = make_certificates(certs, names)
    make_superexec_secret(certs)
    make_node_keys(keys, nodes)
    return files


def _private_pem(key: ec.EllipticCurvePrivateKey, form: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
