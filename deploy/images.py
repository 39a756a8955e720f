"""Builds the two images with the Docker SDK from a local wheelhouse (no registry needed).

The wheelhouse is filled on the host first (`docker/wheelhouse.sh`), so the build itself
never reaches the package index: the same path works air-gapped and in CI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from docker.errors import BuildError, ImageNotFound

import docker
from deploy.backends.docker import engine
from deploy.compose import APP_IMAGE, SUPERLINK_IMAGE
from deploy.errors import DeployError

# Targets of docker/Dockerfile and the tags compose files refer to.
IMAGES = {"superlink": SUPERLINK_IMAGE, "app": APP_IMAGE}
GPU_BASE = "default"  # keep the Dockerfile's own BASE_IMAGE (a CUDA PyTorch image)


DIGEST_LABEL = "flowertune-deploy.source-digest"
# What docker/Dockerfile copies into the app image.
SOURCES = ("pyproject.toml", "README.md", "app", "deploy", "docker/Dockerfile")


def source_digest(app_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        root = app_dir / name
        for path in sorted([root] if root.is_file() else root.rglob("*.py")):
            digest.update(str(path.relative_to(app_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def outdated_images(client: docker.DockerClient, app_dir: Path) -> list[str]:
    """Missing images, and an app image built from sources other than these."""
    outdated = []
    for tag in IMAGES.values():
        try:
            image = client.images.get(tag)
        except ImageNotFound:
            outdated.append(tag)
            continue
        if tag == APP_IMAGE and image.labels.get(DIGEST_LABEL) != source_digest(app_dir):
            outdated.append(tag)
    return outdated


def build_images(app_dir: Path, base_image: str = GPU_BASE, torch_spec: str | None = None) -> dict[str, str]:
    """Returns tag -> image id. A PyTorch base brings its own torch, so none is fetched for it."""
    if torch_spec is None and base_image == GPU_BASE:
        torch_spec = "none"
    env = None if torch_spec is None else {**os.environ, "TORCH_SPEC": torch_spec}
    # pip's warnings are progress here, not our errors: stderr stays the one line that says why `up` stopped.
    filled = subprocess.run(
        ["bash", str(app_dir / "docker" / "wheelhouse.sh")], cwd=app_dir, env=env, stderr=subprocess.STDOUT
    )
    if filled.returncode != 0:
        raise DeployError(f"docker/wheelhouse.sh exited with code {filled.returncode} (its output is above)")
    client = engine()
    args = {"SOURCE_DIGEST": source_digest(app_dir)}
    if base_image != GPU_BASE:
        args["BASE_IMAGE"] = base_image
    built = {}
    for target, tag in IMAGES.items():
        try:
            image, _ = client.images.build(
                path=str(app_dir), dockerfile="docker/Dockerfile", target=target, tag=tag, buildargs=args, rm=True
            )
        except BuildError as failed:
            raise DeployError(f"building {tag} (docker/Dockerfile, target {target}) failed: {failed.msg}") from None
        built[tag] = image.id
    return built
