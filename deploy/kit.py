"""`deploy kit`: one self-contained folder per topology host, to hand to the site that runs it.

A command of its own rather than `deploy render --kit`: `render` rewrites compose files in
the app folder that point at its `.deploy/` material, and may be rerun at will; a kit is
what a site receives (as `nvflare provision`'s startup kits): it carries keys, so it never
overwrites a folder, and it brings its images or their build context and a README, none of
which belongs beside the app's own compose files.

Everything comes from the same topology and render options as `deploy render`, with the TLS
material given (`RenderOptions.tls_given`): no host's `setup` makes a certificate or a key,
and a missing file stops `docker compose up` in one line. A kit holds exactly the files its
compose file binds, so a host receives the private keys of its own SuperNodes and nothing
else; the SuperLink's host alone also receives the CA key (below).
"""

from __future__ import annotations

import dataclasses
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker.errors import ImageNotFound
from docker.utils.build import exclude_paths

from app.durable import write_durably
from deploy.backends.docker import engine
from deploy.compose import RenderOptions, certificate_names, dump, make_given_material, render
from deploy.errors import DeployError
from deploy.images import IMAGES
from deploy.tls import SUPEREXEC_SECRET
from deploy.topology import Topology

IMAGE_WAYS = ("build", "save")  # how a kit brings its images: their build context, or `docker save` archives
CERTS, KEYS, BUILD, IMAGES_DIR = "certs", "keys", "build", "images"  # the kit's folders
COMPOSE_FILE = "compose.yaml"  # the name `docker compose` finds without -f


@dataclass(frozen=True)
class Kit:
    host: str
    folder: Path
    start: str  # the one command, run inside `folder`, that starts the host's part
    archive: Path | None = None


def write_kits(
    topology: Topology,
    options: RenderOptions,
    app_dir: Path,
    material_dir: Path,
    out: Path,
    images: str = "build",
    archive: bool = False,
) -> list[Kit]:
    """A kit per host under `out` (which must be new or empty), from the TLS material in
    `material_dir` (`options.certs_dir`, `options.keys_dir` under it: where `deploy up` and
    compose's `setup` keep it), made there first where missing."""
    if options.insecure:
        raise DeployError("--insecure: a kit crosses machines and always carries TLS; leave --insecure out")
    if images not in IMAGE_WAYS:
        raise DeployError(f"--images {images!r}: expected one of {', '.join(IMAGE_WAYS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DeployError(f"--out {out}: is not an empty folder; name a new one (kits are never overwritten)")
    make_given_material(topology, options, material_dir)
    certs, keys = material_dir / options.certs_dir, material_dir / options.keys_dir
    given = dataclasses.replace(
        options,
        certs_dir=f"./{CERTS}",
        keys_dir=f"./{KEYS}",
        tls_given=True,
        build_context=f"./{BUILD}" if images == "build" else None,
    )
    kits = []
    for host, document in render(topology, given).items():
        folder = out / host
        _private_folder(folder)
        write_durably(folder / COMPOSE_FILE, dump(document).encode())
        for name in _given_files(document, ca_key=host == topology.superlink_host):
            source = (certs if name.startswith(f"{CERTS}/") else keys) / name.partition("/")[2]
            _private_folder((folder / name).parent)
            write_durably(folder / name, _read(source), mode=0o600 if _is_secret(name) else 0o644)
        if images == "build":
            _copy_build_context(app_dir, folder / BUILD)
        else:
            _save_images(_images_of(document), folder / IMAGES_DIR)
        kit = Kit(host, folder, _start_command(document, images))
        write_durably(folder / "README.md", _readme(topology, kit, images, options).encode())
        kits.append(dataclasses.replace(kit, archive=_archive(folder) if archive else None))
    return kits


def _private_folder(folder: Path) -> None:
    """0700: a kit's folders hold keys; the engine (root) still reads the files it binds."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)


def _read(source: Path) -> bytes:
    """Compose's `setup` (root) keeps ca.key root's and hands the rest to uid 1000: a user who
    is neither gets one line, not a traceback."""
    try:
        return source.read_bytes()
    except PermissionError:
        raise DeployError(f"{source}: not readable by this user; run `deploy kit` as root or as its owner") from None


def _is_secret(name: str) -> bool:
    return name.endswith(".key") or name.endswith(SUPEREXEC_SECRET)


def _given_files(document: dict[str, Any], ca_key: bool) -> list[str]:
    """The kit-relative files the document binds from certs/ and keys/ (the `setup` service's
    whole-folder binds aside), plus, on the SuperLink's host, the CA key: the site that runs
    the SuperLink owns the federation and alone can sign a new SuperLink certificate later."""
    files = {
        volume["source"].removeprefix("./")
        for service in document["services"].values()
        for volume in service.get("volumes", [])
        if isinstance(volume, dict) and volume["source"].removeprefix("./").startswith((f"{CERTS}/", f"{KEYS}/"))
    }
    return sorted(files | ({f"{CERTS}/ca.key"} if ca_key else set()))


def _images_of(document: dict[str, Any]) -> list[str]:
    return sorted({service["image"] for service in document["services"].values()})


def _copy_build_context(app_dir: Path, target: Path) -> None:
    """What `docker build` would send from the app folder: .dockerignore read as the Docker
    SDK reads it, applied by the SDK's own matcher, so the kit never drifts from the build."""
    ignore = app_dir / ".dockerignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for relative in sorted(exclude_paths(str(app_dir), patterns, dockerfile="docker/Dockerfile")):
        source = app_dir / relative
        if source.is_file() and not source.is_symlink():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)


def _save_images(tags: list[str], target: Path) -> None:
    """One `docker save` archive per image, named by its Dockerfile target; an image the
    engine lacks stops the kit with one line (build it first, or use --images build)."""
    client = engine()
    target.mkdir(parents=True, exist_ok=True)
    for tag in tags:
        try:
            image = client.images.get(tag)
        except ImageNotFound:
            raise DeployError(
                f"--images save: the engine has no image {tag}; build it (`deploy up --build`) or use --images build"
            ) from None
        with open(target / f"{_target_of(tag)}.tar", "wb") as archive:
            for chunk in image.save(named=tag):  # the tag compose names, not whichever comes first
                archive.write(chunk)


def _target_of(tag: str) -> str:
    return next(target for target, image in IMAGES.items() if image == tag)


def _start_command(document: dict[str, Any], images: str) -> str:
    tags = _images_of(document) if images == "save" else []
    loads = [f"docker load -i {IMAGES_DIR}/{_target_of(tag)}.tar" for tag in tags]
    return " && ".join([*loads, "docker compose up -d"])


def _archive(folder: Path) -> Path:
    """`<host>.tar.gz` beside the folder, 0600 like the keys inside; modes are kept, so
    unpacking gives the same 0700 folders and 0600 keys."""
    path = folder.with_name(f"{folder.name}.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    path.chmod(0o600)
    return path


def _readme(topology: Topology, kit: Kit, images: str, options: RenderOptions) -> str:
    return "\n".join(_readme_lines(topology, kit, images, options)) + "\n"


def _readme_lines(topology: Topology, kit: Kit, images: str, options: RenderOptions) -> Iterator[str]:
    first = kit.host == topology.superlink_host
    nodes = topology.nodes_on(kit.host)
    address = topology.superlink_endpoint
    role = "the SuperLink, the ServerApp and " if first else ""
    yield f"# Kit for {kit.host}: {role}{len(nodes)} SuperNodes"
    yield ""
    yield "Generated by `deploy kit`; regenerate it from the topology rather than edit it."
    yield "Start it from this folder (as root or a member of the `docker` group):"
    yield ""
    yield f"    {kit.start}"
    yield ""
    if images == "build":
        yield "The first start builds the images from `build/` (docker/Dockerfile): it pulls the base image"
        yield "and installs the dependencies from `build/docker/wheelhouse` if it was filled, else from the"
        yield "package index. Without network access, ask for a kit made with `--images save`."
    else:
        yield "The images come as `docker save` archives in `images/`; nothing is pulled or built."
    yield ""
    yield "SuperNodes here:"
    yield ""
    yield from (f"- {n.name}: partition {n.partition_id}, {'CPU' if n.gpu is None else f'GPU {n.gpu}'}" for n in nodes)
    yield ""
    if any(n.gpu is not None for n in nodes):
        how = "NVIDIA's container toolkit" if options.gpu_request == "nvidia" else "a CDI spec for nvidia.com/gpu"
        yield f"Their GPUs are requested through {how} (`--gpu-request {options.gpu_request}`)."
        yield ""
    if first:
        yield f"Other hosts reach the SuperLink here at {address} (TLS): open TCP port {topology.superlink_port}"
        yield "to them."
        yield f"Its certificate names {', '.join(certificate_names(topology))}."
        yield f"`submit` runs the app once all {len(topology.nodes)} SuperNodes of every host are online; results"
        yield "land in `./results`."
        yield ""
        yield "`certs/ca.key` is the private CA's key and `certs/superlink.key`, `certs/superexec.secret` the"
        yield "SuperLink's secrets: they are in this kit only; never copy them elsewhere. `keys/*.pub` are every"
        yield "SuperNode's public key: `register-nodes` registers them, so only those nodes may join."
    else:
        yield f"The SuperNodes connect out to the SuperLink at {address} (TLS): this host must reach that"
        yield f"address on TCP port {topology.superlink_port}; nothing here listens."
        yield ""
        yield "`certs/ca.crt` is the federation's private CA, made by `deploy kit` with the SuperLink's"
        yield "certificate (its key stays with the SuperLink's kit). `keys/<node>.key` are this host's"
        yield "SuperNodes' private keys; the SuperLink admits them because their public keys are registered there."
    yield ""
    yield "A missing file stops `docker compose up` with `bind source path does not exist: <path>`: the kit"
    yield "is incomplete; ask for a new one rather than create the file. A gated model needs a token file:"
    yield "`HF_TOKEN_FILE=/path/to/token docker compose up -d`."
