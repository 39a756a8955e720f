"""A Container Device Interface spec for NVIDIA GPUs, for hosts without NVIDIA's container toolkit.

Where the toolkit is installed, `nvidia-ctk cdi generate` writes this spec. It is in neither
Debian nor PyPI, so a GPU host may have the driver and nothing else. A CDI-enabled engine
(Docker 25+ with `features.cdi`, Podman) still hands GPUs to containers if the spec lists:
- each GPU's device node, named by its index (`nvidia.com/gpu=0`, what `deploy render
  --gpu-request cdi` asks for);
- the control nodes every CUDA process opens;
- the driver's user-space libraries, which must match the host's kernel module and so
  cannot come from the image. They are bound read-only at /usr/local/nvidia/lib64, the
  folder that CUDA images (pytorch/pytorch, nvidia/cuda) already put on LD_LIBRARY_PATH.

What it does not do that the toolkit does: no ldcache hook (so an image whose
LD_LIBRARY_PATH lacks that folder will not find libcuda), no MIG devices.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from deploy.errors import DeployError

KIND = "nvidia.com/gpu"
LIBRARY_TARGET = "/usr/local/nvidia/lib64"
# Opened by every CUDA process, whichever GPU it uses.
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
# The driver's own libraries, as opposed to the CUDA runtime an image brings.
DRIVER_LIBRARY = re.compile(r"^lib(cuda|cudadebugger|nvidia-[\w-]+|nvcuvid|nvoptix)\.so(\.\d+)*$")
# Driver tools a container may run (nvidia-smi shows which GPU it was given).
TOOLS = ("nvidia-smi",)


def gpu_nodes(dev: Path) -> list[Path]:
    """/dev/nvidia<N> in index order; N is the minor number, which nvidia-smi's index follows."""
    nodes = [p for p in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    return sorted(nodes, key=lambda p: int(p.name.removeprefix("nvidia")))


def driver_library_dirs() -> list[Path]:
    """The folders the dynamic loader finds libcuda in (`ldconfig -p`)."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    found = (line.rsplit("=>", 1)[-1].strip() for line in listing.splitlines() if "libcuda.so" in line)
    return list(dict.fromkeys(Path(path).parent for path in found))


def driver_libraries(folders: list[Path]) -> list[Path]:
    """Every name of every driver library (real files and their .so.1 links), first folder first."""
    seen: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if DRIVER_LIBRARY.match(path.name) and path.name not in seen and path.exists():
                seen[path.name] = path
    return list(seen.values())


def _mount(host: Path, target: str) -> dict[str, Any]:
    return {"hostPath": str(host), "containerPath": target, "options": ["ro", "nosuid", "nodev", "bind"]}


def spec(dev: Path, library_dirs: list[Path], tools: list[Path]) -> dict[str, Any]:
    gpus = gpu_nodes(dev)
    if not gpus:
        raise DeployError(f"no GPU device nodes ({dev}/nvidia0, ...): is the NVIDIA driver loaded?")
    libraries = driver_libraries(library_dirs)
    if not any(lib.name.startswith("libcuda.so") for lib in libraries):
        folders = ", ".join(map(str, library_dirs)) or "none found by ldconfig"
        raise DeployError(f"no libcuda.so in the driver library folders ({folders}): pass --library-dir")
    controls = [dev / name for name in CONTROL_NODES if (dev / name).exists()]
    return {
        "cdiVersion": "0.5.0",
        "kind": KIND,
        "devices": [
            {
                "name": node.name.removeprefix("nvidia"),
                "containerEdits": {"deviceNodes": [{"path": f"/dev/{node.name}", "hostPath": str(node)}]},
            }
            for node in gpus
        ],
        "containerEdits": {
            "deviceNodes": [{"path": f"/dev/{node.name}", "hostPath": str(node)} for node in controls],
            "mounts": [
                *(_mount(lib, f"{LIBRARY_TARGET}/{lib.name}") for lib in libraries),
                *(_mount(tool, f"/usr/bin/{tool.name}") for tool in tools),
            ],
        },
    }


def cmd_cdi_spec(args: Any) -> int:
    folders = args.library_dir or driver_library_dirs()
    tools = [Path(found) for found in map(shutil.which, TOOLS) if found]
    document = spec(args.dev, folders, tools)
    text = yaml.safe_dump(document, sort_keys=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        names = [d["name"] for d in document["devices"]]
        print(f"{args.out}: {KIND}={{{','.join(names)}}}, {len(document['containerEdits']['mounts'])} driver files")
    else:
        print(text, end="")
    return 0


def add_command(commands: Any) -> None:
    p = commands.add_parser(
        "cdi-spec", help="write a CDI spec for this host's NVIDIA GPUs (no container toolkit needed)"
    )
    p.add_argument("--out", type=Path, help="file to write, e.g. /etc/cdi/nvidia.yaml (default: print it)")
    p.add_argument("--dev", type=Path, default=Path("/dev"), help="where the device nodes are (default /dev)")
    p.add_argument(
        "--library-dir",
        type=Path,
        action="append",
        help="folder of the driver's libraries (repeat; default: where ldconfig finds libcuda)",
    )
    p.set_defaults(func=cmd_cdi_spec)
