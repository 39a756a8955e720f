"""`deploy kit`: what each host's folder holds, on disk, for 2- and 3-host layouts.

Kits are written under tmp_path from this repository (read only): the build context and the
run config come from it, the TLS material is made in a scratch `--dir`.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from deploy.cli import main
from deploy.project import resolve_run_config
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(120)

NODES = resolve_run_config(ROOT, {})[1].dataset.num_partitions
SUPERLINK_ONLY = {"certs/ca.key", "certs/superlink.crt", "certs/superlink.key", "certs/superexec.secret"}
SECRETS = {"certs/ca.key", "certs/superlink.key", "certs/superexec.secret"}
LAYOUTS = {
    "2 hosts": ("gpu-a=0", "gpu-b=0,1"),
    "3 hosts": ("gpu-a=0,1", "gpu-b=0", "cpu-c"),
}


def kit(tmp_path: Path, hosts: tuple[str, ...], *extra: str, out: str = "kits", app: Path = ROOT) -> Path:
    argv = ["--app", str(app), "kit", "--superlink-address", "10.0.0.5", "--dir", str(tmp_path / "here")]
    argv += [a for host in hosts for a in ("--host", host)]
    assert main([*argv, "--out", str(tmp_path / out), *extra]) == 0
    return tmp_path / out


def owners(hosts: tuple[str, ...]) -> dict[str, str]:
    """Node name -> host, as the layout promises: node i takes (host, GPU) slot i mod S."""
    slots = [spec.partition("=")[0] for spec in hosts for _ in (spec.partition("=")[2].split(",") or [""])]
    return {f"supernode-{i}": slots[i % len(slots)] for i in range(NODES)}


def files_in(folder: Path, skip: str = "build") -> set[str]:
    paths = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return {str(path) for path in paths if path.parts[0] != skip}


def binds(document: dict) -> list[dict]:
    return [v for s in document["services"].values() for v in s.get("volumes", []) if isinstance(v, dict)]


@pytest.mark.unit
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_kit_holds_its_own_keys_and_only_the_superlink_kit_its_secrets(tmp_path, layout):
    hosts = LAYOUTS[layout]
    out = kit(tmp_path, hosts)
    names = [spec.partition("=")[0] for spec in hosts]
    node_host = owners(hosts)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    superlink = out / names[0]
    for host in names:
        folder = out / host
        own = {f"keys/{node}.key" for node, h in node_host.items() if h == host}
        expected = {"compose.yaml", "README.md", "certs/ca.crt", *own}
        if host == names[0]:
            expected |= SUPERLINK_ONLY | {f"keys/{node}.pub" for node in node_host}
        assert files_in(folder) == expected
        # Modes: folders 0700, secrets and private keys 0600.
        for path in (folder, folder / "certs", folder / "keys"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700
        for name in expected & (SECRETS | own):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
        # Every private key is the one whose public half the SuperLink's host registers.
        for name in own:
            key = serialization.load_ssh_private_key((folder / name).read_bytes(), password=None)
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            assert public == (superlink / name.replace(".key", ".pub")).read_bytes().strip()
        assert (folder / "certs/ca.crt").read_bytes() == (superlink / "certs/ca.crt").read_bytes()
        # The compose file binds only files of its kit, and every key and certificate it holds.
        document = yaml.safe_load((folder / "compose.yaml").read_text())
        sources = {v["source"].removeprefix("./") for v in binds(document)}
        assert all((folder / source).exists() for source in sources)
        bound_files = {s for s in sources if (folder / s).is_file()}
        assert bound_files == expected - {"compose.yaml", "README.md", "certs/ca.key"}
        assert all(v["bind"] == {"create_host_path": False} for v in binds(document))
        for service in document["services"].values():
            assert (folder / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        readme = (folder / "README.md").read_text()
        assert "docker compose up -d" in readme and "10.0.0.5:8000" in readme
    ca = x509.load_pem_x509_certificate((superlink / "certs/ca.crt").read_bytes())
    x509.load_pem_x509_certificate((superlink / "certs/superlink.crt").read_bytes()).verify_directly_issued_by(ca)


@pytest.mark.unit
def test_the_build_context_is_what_dockerignore_lets_through(tmp_path):
    folder = kit(tmp_path, LAYOUTS["2 hosts"]) / "gpu-b"
    context = {str(p.relative_to(folder / "build")) for p in (folder / "build").rglob("*") if p.is_file()}
    assert {"docker/Dockerfile", "pyproject.toml", "README.md", "app/config.py", "deploy/kit.py"} <= context
    assert not any(path.startswith(("tests/", ".git", ".venv", "bench/")) or "__pycache__" in path for path in context)


def sources_without_wheelhouse(tmp_path: Path) -> Path:
    """This app's sources without docker/wheelhouse, which the Docker tests fill (400+ MB that
    would be packed three times here): what is archived, not how much, is under test."""
    app = tmp_path / "app-sources"
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, app / name)
    for name in ("app", "deploy", "docker"):
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("wheelhouse", "__pycache__"))
    return app


@pytest.mark.unit
def test_archives_unpack_to_the_same_files_and_modes_and_the_ca_is_kept_between_kits(tmp_path):
    hosts = LAYOUTS["3 hosts"]
    app = sources_without_wheelhouse(tmp_path)
    out = kit(tmp_path, hosts, "--archive", app=app)
    again = kit(tmp_path, hosts, out="again", app=app)  # same --dir: the CA and node keys made above are reused
    for host in ("gpu-a", "gpu-b", "cpu-c"):
        archive = out / f"{host}.tar.gz"
        assert stat.S_IMODE(archive.stat().st_mode) == 0o600
        with tarfile.open(archive) as tar:
            members = {m.name: stat.S_IMODE(m.mode) for m in tar.getmembers() if m.isfile()}
        folder = out / host
        assert set(members) == {f"{host}/{p.relative_to(folder)}" for p in folder.rglob("*") if p.is_file()}
        assert all(mode == 0o600 for name, mode in members.items() if name.endswith(".key"))
        assert files_in(again / host) == files_in(folder)
        for name in files_in(folder) - {"compose.yaml", "README.md"}:
            assert (again / host / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.unit
def test_setup_on_a_node_host_hands_the_kit_over_and_makes_nothing(tmp_path):
    """What the kit's `setup` service runs (as root there, as here when tests run as root)."""
    folder = kit(tmp_path, LAYOUTS["2 hosts"]) / "gpu-b"
    before = files_in(folder)
    argv = ["setup-host", "--certs", str(folder / "certs"), "--keys", str(folder / "keys"), "--given"]
    done = subprocess.run([sys.executable, "-m", "deploy", "--app", str(ROOT), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert files_in(folder) == before
    for name in (n for n in before if n.startswith("keys/")):
        mode = (folder / name).stat()
        assert stat.S_IMODE(mode.st_mode) == 0o600
        if os.geteuid() == 0:
            assert (mode.st_uid, mode.st_gid) == (1000, 1000)


@pytest.mark.docker
def test_docker_compose_accepts_every_kit(tmp_path, docker_engine):
    out = kit(tmp_path, LAYOUTS["3 hosts"])
    for folder in out.iterdir():
        done = subprocess.run(["docker", "compose", "config", "-q"], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, f"{folder.name}: {done.stderr}"


@pytest.mark.parametrize(
    "argv, setting",
    [
        (["--host", "gpu a=0", "--host", "gpu-b"], "--host"),
        (["--host", "gpu-a=0,x", "--host", "gpu-b"], "--host 'gpu-a=0,x': expected GPU ids"),
        (["--host", "gpu-a=0", "--host", "gpu-b", "--insecure"], "--insecure"),
        (["--superlink-address", "10.0.0.5"], "--host"),
        (["--host", "gpu-a=0", "--host", "gpu-b", "--out", "{existing}"], "--out"),
    ],
)
@pytest.mark.unit
def test_a_bad_request_is_refused_in_one_line_naming_the_setting(tmp_path, capsys, argv, setting):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "gpu-a").mkdir()
    argv = [a.format(existing=existing) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "kits")]
    code = main(["--app", str(ROOT), "kit", "--dir", str(tmp_path / "here"), *out, *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and setting in err, err
    assert not (tmp_path / "kits").exists() and list(existing.iterdir()) == [existing / "gpu-a"]
