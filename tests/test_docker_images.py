"""The images build from the package index when docker/wheelhouse is absent, as on a fresh
clone where plain `docker compose up` builds them (the wheelhouse stays the air-gapped path)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.docker

HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_superlink_image_builds_from_the_index_without_a_wheelhouse(docker_engine, tmp_path):
    context = tmp_path / "clone"
    context.mkdir()
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy(ROOT / name, context / name)
    for folder in ("app", "deploy"):
        shutil.copytree(ROOT / folder, context / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "docker", context / "docker", ignore=shutil.ignore_patterns("wheelhouse"))
    # This machine reaches the index through its own CA (a TLS proxy); a base image must trust it too.
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(HOST_CA, base / "ca.crt")
    (base / "Dockerfile").write_text(
        f"FROM {docker_engine}\nCOPY ca.crt /usr/local/share/host-ca.crt\nENV PIP_CERT=/usr/local/share/host-ca.crt\n"
    )
    tag, base_tag = "flowertune-index-test/superlink:latest", "flowertune-index-test/base:latest"
    try:
        built = docker("build", "-q", "-t", base_tag, str(base))
        assert built.returncode == 0, built.stderr
        built = docker(
            "build",
            "--no-cache",
            "--network",
            "host",
            "--build-arg",
            f"BASE_IMAGE={base_tag}",
            "--target",
            "superlink",
            "-f",
            str(context / "docker" / "Dockerfile"),
            "-t",
            tag,
            str(context),
        )
        assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
        assert "installing the superlink image's dependencies from the package index" in built.stdout
        ran = docker("run", "--rm", tag, "flower-superlink", "--version")
        assert ran.returncode == 0 and "Flower version: 1.42" in ran.stdout, ran.stdout + ran.stderr
    finally:
        docker("rmi", "-f", tag, base_tag)
