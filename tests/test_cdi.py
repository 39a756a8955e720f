"""`deploy cdi-spec`: a CDI spec from a host's device nodes and driver libraries, on a fake host."""

import os

import pytest
import yaml

from deploy.cdi import spec
from deploy.cli import main

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


@pytest.fixture
def host(tmp_path):
    """Two GPUs, the control nodes, and a driver folder beside the CUDA runtime an image brings."""
    dev, lib = tmp_path / "dev", tmp_path / "lib"
    dev.mkdir(), lib.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia10", "nvidiactl", "nvidia-uvm", "nvidia-caps", "null"):
        (dev / name).touch()
    for name in (
        "libcuda.so.580.159.04",
        "libnvidia-ml.so.580.159.04",
        "libnvidia-ptxjitcompiler.so.580.159.04",
        "libcudart.so.13",
        "libnvrtc.so.13",
        "libcuda.txt",
    ):
        (lib / name).write_bytes(b"\x7fELF")
    os.symlink("libcuda.so.580.159.04", lib / "libcuda.so.1")
    os.symlink("libnvidia-ml.so.580.159.04", lib / "libnvidia-ml.so.1")
    os.symlink("missing.so", lib / "libnvidia-gone.so.1")  # a dangling link is not bound
    return dev, lib


def test_each_gpu_is_a_device_named_by_its_index_and_every_container_gets_the_driver(host):
    dev, lib = host
    document = spec(dev, [lib], [])
    assert document["kind"] == "nvidia.com/gpu"
    assert [(d["name"], d["containerEdits"]["deviceNodes"]) for d in document["devices"]] == [
        (str(i), [{"path": f"/dev/nvidia{i}", "hostPath": str(dev / f"nvidia{i}")}]) for i in (0, 1, 10)
    ]
    common = document["containerEdits"]
    assert [n["path"] for n in common["deviceNodes"]] == ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    mounts = {m["containerPath"]: m for m in common["mounts"]}
    # The driver's libraries (both names of each), not the CUDA runtime, which the image brings.
    assert sorted(mounts) == [
        f"/usr/local/nvidia/lib64/{n}"
        for n in (
            "libcuda.so.1",
            "libcuda.so.580.159.04",
            "libnvidia-ml.so.1",
            "libnvidia-ml.so.580.159.04",
            "libnvidia-ptxjitcompiler.so.580.159.04",
        )
    ]
    assert all(
        m["options"][0] == "ro" and m["hostPath"] == str(lib / m["containerPath"].rsplit("/", 1)[1])
        for m in mounts.values()
    )


def test_the_command_writes_the_spec_and_names_what_it_found(host, tmp_path, capsys):
    dev, lib = host
    out = tmp_path / "cdi" / "nvidia.yaml"
    assert main(["cdi-spec", "--dev", str(dev), "--library-dir", str(lib), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: nvidia.com/gpu={{0,1,10}}, 5 driver files"
    assert yaml.safe_load(out.read_text()) == spec(dev, [lib], [])


def test_a_host_without_gpus_or_driver_is_refused_in_one_line(host, tmp_path, capsys):
    dev, lib = host
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["cdi-spec", "--dev", str(empty), "--library-dir", str(lib)]) == 2
    assert (
        capsys.readouterr().err == f"error: no GPU device nodes ({empty}/nvidia0, ...): is the NVIDIA driver loaded?\n"
    )
    assert main(["cdi-spec", "--dev", str(dev), "--library-dir", str(empty)]) == 2
    assert (
        capsys.readouterr().err == f"error: no libcuda.so in the driver library folders ({empty}): pass --library-dir\n"
    )
