"""The secret scan: where a token value or a private key must never be, look for it.

`tests/test_docker_stack.py` runs it over the stack it already started and ran (every layer
of its images, every container's log and inspect record, the runs' files); the tests here
prove the scanner itself finds what it is looking for, so a clean scan means something.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

pytestmark = pytest.mark.unit

# A PEM or OpenSSH private key block: header, base64 lines, footer, with real or escaped
# (JSON, repr) line breaks. Not the bare marker: libraries in the images spell it in code
# (cryptography's `_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"`) without a key.
_BREAK = rb"(?:\r?\n|(?:\\r)?\\n)"
PRIVATE_KEY = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----"
    + _BREAK
    + rb"(?:[A-Za-z-]+: [^\r\n\\]*"
    + _BREAK
    + rb")*"
    + _BREAK
    + rb"?"
    + rb"(?:[A-Za-z0-9+/=]{1,80}"
    + _BREAK
    + rb")+"
    + rb"-----END \1PRIVATE KEY-----"
)
# Third-party files in the images that ship published test keys in full: pycryptodome's
# self-tests (flwr depends on it) and GnuTLS's FIPS self-test keys (Debian's libgnutls).
PUBLISHED_TEST_KEYS = ("/site-packages/Crypto/SelfTest/", "/libgnutls.so.")
CHUNK = 8 << 20
# Longer than any private key block, so one split by a chunk boundary is whole in the next read.
OVERLAP = 16 << 10


def leaks(stream: IO[bytes], token: bytes) -> set[str]:
    """What `stream` holds of the two: 'token', 'private key'; read in chunks, so a 500 MB
    library in an image layer costs no more memory than a log line."""
    found: set[str] = set()
    tail = b""
    while chunk := stream.read(CHUNK):
        window = tail + chunk
        if token in window:
            found.add("token")
        if PRIVATE_KEY.search(window):
            found.add("private key")
        tail = window[-OVERLAP:]
    return found


def scan_bytes(data: bytes, where: str, token: bytes) -> list[str]:
    return [f"{where}: {what}" for what in sorted(leaks(io.BytesIO(data), token))]


def scan_tar(stream: IO[bytes], where: str, token: bytes) -> Iterator[str]:
    """Every file of a tar stream, and of the tars inside it: `docker save` writes each image
    layer as a tar, next to the image's config (its environment, labels and build history)."""
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            name = f"{where}/{member.name}"
            content = archive.extractfile(member)
            if member.name.endswith(".tar"):
                yield from scan_tar(content, name, token)
                continue
            found = leaks(content, token)
            if any(part in name for part in PUBLISHED_TEST_KEYS):
                found.discard("private key")
            yield from (f"{name}: {what}" for what in sorted(found))


def scan_images(image_ids: Iterable[str], token: bytes) -> list[str]:
    """`docker save` streamed through the scanner: nothing of the images is written to disk."""
    with subprocess.Popen(["docker", "save", *image_ids], stdout=subprocess.PIPE) as save:
        found = list(scan_tar(save.stdout, "image", token))
    assert save.returncode == 0, "docker save failed"
    return found


def scan_tree(root: Path, token: bytes) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with path.open("rb") as stream:
            found += [f"{path}: {what}" for what in sorted(leaks(stream, token))]
    return found


def private_key(form: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> bytes:
    """Our TLS keys are PKCS8, our SuperNode keys OpenSSH (deploy/tls.py)."""
    key = ec.generate_private_key(ec.SECP384R1())
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


TOKEN = b"hf_planted0123456789abcdef"


def test_the_scanner_finds_a_planted_token_and_keys_in_files(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_bytes(b"INFO starting\nAuthorization: Bearer " + TOKEN + b"\n")
    (tmp_path / "node.key").write_bytes(private_key(serialization.PrivateFormat.OpenSSH))
    (tmp_path / "escaped.json").write_bytes(repr(private_key()).encode())  # a key logged as a string
    (tmp_path / "clean.py").write_bytes(
        b'_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"\n'
        b'_SK_END = b"-----END OPENSSH PRIVATE KEY-----"\nhf_other\n'
    )
    assert scan_tree(tmp_path, TOKEN) == [
        f"{tmp_path}/escaped.json: private key",
        f"{tmp_path}/logs/app.log: token",
        f"{tmp_path}/node.key: private key",
    ]


def test_the_scanner_finds_what_a_chunk_boundary_splits():
    for cut in (CHUNK - 5, CHUNK - 200):  # inside the token, inside the key
        data = b"x" * cut + TOKEN + b"\n" + private_key() + b"y" * 100
        assert leaks(io.BytesIO(data), TOKEN) == {"token", "private key"}


def test_the_scanner_opens_the_layer_tars_of_a_saved_image():
    def tar(files: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return out.getvalue()

    test_vectors = "opt/venv/lib/python3.11/site-packages/Crypto/SelfTest/PublicKey/test_import_ECC.py"
    layer = tar(
        {
            "etc/app.conf": b"token=" + TOKEN,
            "srv/tls.key": private_key(),
            test_vectors: private_key() + TOKEN,  # a published key is not ours; a token there still counts
            "bin/ok": b"\0" * 1000,
        }
    )
    config = b'{"config":{"Env":["HF_TOKEN=' + TOKEN + b'"]}}'  # a token passed as ENV or build arg lands here
    saved = tar({"manifest.json": b"[]", "abc123/layer.tar": layer, "def456.json": config})
    assert list(scan_tar(io.BytesIO(saved), "image", TOKEN)) == [
        "image/abc123/layer.tar/etc/app.conf: token",
        "image/abc123/layer.tar/srv/tls.key: private key",
        f"image/abc123/layer.tar/{test_vectors}: token",
        "image/def456.json: token",
    ]
