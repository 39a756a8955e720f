"""Pack the wheels the GPU machine lacks into one small .tar.xz that fits the device carry limit.

Run here (the development machine), then carry the output folder to the device and run
bench/gpu_setup.sh there. The device has torch 2.11 (cu130), transformers 5.17, peft 0.21,
accelerate, numpy, huggingface_hub, tokenizers, safetensors, pillow, jinja2... but not flwr,
flwr-datasets, datasets, bitsandbytes, pyarrow, etc., and no internet.

    python bench/pack_wheels.py --download /tmp/whl --out .gpu-carry/pack
    cp pip-26.0.1-py3-none-any.whl .gpu-carry/pack/    # bench/gpu_setup.sh runs pip from it
    python bench/pack_wheels.py --ray --download /tmp/whl-ray --out .gpu-carry/ray   # Flower's Simulation Engine

`--ray` packs what `flwr[simulation]` adds (Ray 2.55.1 and what of its closure neither the
device nor the main pack has) apart, so that only the calls that run the Simulation Engine
carry it (`.gpu-carry/ray`; gpu_setup.sh adds it to the venv): with the main pack, the data
and the tree such a call carries about 60 MiB of the 64 MiB allowed. Ray's wheel is 70 MiB;
trimmed of its Java jars, its dashboard's web build and the libraries Flower's engine does
not import (rllib, tune, train, serve) it packs to 17.8 MiB (2026-12-07).

As used on 2026-11-25 (47 wheels, 21.2 MiB): the default --exclude leaves out what the
device image already has in a compatible version (its pip list: bench/results/inventory.txt, in git history at f7f36fd);
the venv still shadows packaging, protobuf, rich, typer and fsspec, whose device versions
(26.3, 7.36, 15.0, 0.27, 2026.7) are outside flwr 1.42's / datasets 4.8.5's pins.

What it does:
  1. `pip download` the closure of flwr 1.42 / flwr-datasets 0.6.1 / datasets / bitsandbytes
     0.50.2 / docker / tomli-w / pyyaml for CPython 3.12 manylinux x86_64 (--download dir).
  2. Drops what the device already has or what we never use (torch, nvidia-*, triton, numpy,
     uv: runtime dependency installation is disabled by our launcher, ...).
  3. Trims two big wheels without changing what we import:
       bitsandbytes: keeps only the CUDA 13.0/13.2 and CPU libraries (torch there is cu130);
       pyarrow: drops Flight, S3, the C++ test module, headers and sources (checked here:
       datasets' json loader + flwr-datasets partitioning work without them).
  4. Rewrites every wheel as an *uncompressed* zip (RECORD fixed for removed files) and
     tars them with xz -9, which compresses much better than the wheels' own deflate.
"""

from __future__ import annotations

import argparse
import fnmatch
import lzma
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REQUIREMENTS = [
    "flwr==1.42.0",
    "flwr-datasets==0.6.1",
    "datasets==4.8.5",
    "bitsandbytes==0.50.2",
    "docker==7.2.0",
    "tomli-w",
    "pyyaml",
]
PLATFORMS = [
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux1_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
]
# Present on the device image (KINDS.md pip list / torch deps) or not needed at all.
SKIP = [
    "torch-*",
    "nvidia_*",
    "cuda_*",
    "triton-*",
    "numpy-*",
    "sympy-*",
    "mpmath-*",
    "networkx-*",
    "jinja2-*",
    "markupsafe-*",
    "filelock-*",
    "huggingface_hub-*",
    "hf_xet-*",
    "pillow-*",
    "uv-*",  # only for `uv sync` runtime installs, which the launcher disables
]
# On the device image in a version our pins accept (inventory of 2026-11-25).
DEVICE_PRESENT = [
    "pyarrow-*",
    "pandas-*",
    "matplotlib-*",
    "fonttools-*",
    "kiwisolver-*",
    "contourpy-*",
    "cycler-*",
    "pyparsing-*",
    "seaborn-*",
    "python_dateutil-*",
    "uvloop-*",
    "grpcio-1*",
    "aiohttp-*",
    "multidict-*",
    "yarl-*",
    "propcache-*",
    "frozenlist-*",
    "aiosignal-*",
    "aiohappyeyeballs-*",
    "attrs-*",
    "pygments-*",
    "xxhash-*",
    "tqdm-*",
    "requests-*",
    "httpx-*",
    "httpcore-*",
    "h11-*",
    "mdurl-*",
    "shellingham-*",
    "typing_extensions-*",
    "pathspec-*",
]
SIMULATION = ["ray==2.55.1"]  # what flwr[simulation]==1.42.0 pins for Python 3.11-3.12
TRIM = {
    "ray-*": [
        "ray/jars/*",
        "ray/dashboard/client/build/*",
        "ray/rllib/*",
        "ray/tune/*",
        "ray/train/*",
        "ray/serve/*",
    ],
    "bitsandbytes-*": [
        "bitsandbytes/libbitsandbytes_rocm*.so",
        "bitsandbytes/libbitsandbytes_cuda1[12]*.so",
        "bitsandbytes/libbitsandbytes_xpu*.so",
    ],
    "pyarrow-*": [
        "pyarrow/libarrow_flight.so*",
        "pyarrow/libarrow_s3.so*",
        "pyarrow/libarrow_python_flight.so*",
        "pyarrow/_flight.*.so",
        "pyarrow/_s3fs.*.so",
        "pyarrow/_pyarrow_cpp_tests.*.so",
        "pyarrow/include/*",
        "pyarrow/src/*",
        "pyarrow/tests/*",
    ],
}


def download(dest: Path, requirements: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "-d",
        str(dest),
    ]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + requirements, check=True)


def restore_stored(src: Path, dest: Path, drop: list[str]) -> tuple[int, int]:
    removed = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        dropped = {n for n in names if any(fnmatch.fnmatch(n, pat) for pat in drop)}
        for name in names:
            if name in dropped:
                removed += zin.getinfo(name).file_size
                continue
            data = zin.read(name)
            if name.endswith(".dist-info/RECORD") and dropped:
                lines = [line for line in data.decode().splitlines() if line.split(",", 1)[0] not in dropped]
                data = ("\n".join(lines) + "\n").encode()
            info = zipfile.ZipInfo(name, date_time=zin.getinfo(name).date_time)
            info.external_attr = zin.getinfo(name).external_attr
            zout.writestr(info, data, compress_type=zipfile.ZIP_STORED)
    return len(dropped), removed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download", type=Path, default=Path("/tmp/whl"))
    ap.add_argument("--skip-download", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(".gpu-carry/pack"))
    ap.add_argument(
        "--exclude",
        nargs="*",
        default=DEVICE_PRESENT,
        help="more wheel name patterns to leave out (default: what the device image has)",
    )
    ap.add_argument(
        "--ray", action="store_true", help="pack Ray for the Simulation Engine, less the main pack's wheels"
    )
    args = ap.parse_args()
    if args.ray:
        main_pack = (args.out.parent / "pack" / "wheels.txt").read_text().split()
        args.exclude = [*args.exclude, *(name.split("-")[0] + "-*" for name in main_pack)]
    if not args.skip_download:
        download(args.download, SIMULATION if args.ray else REQUIREMENTS)
    stage = args.out / "stage"
    stage.mkdir(parents=True, exist_ok=True)
    for old in stage.glob("*.whl"):
        old.unlink()
    kept = []
    for whl in sorted(args.download.glob("*.whl")):
        if any(fnmatch.fnmatch(whl.name, p) for p in SKIP + args.exclude):
            continue
        drop = next((pats for pat, pats in TRIM.items() if fnmatch.fnmatch(whl.name, pat)), [])
        n, size = restore_stored(whl, stage / whl.name, drop)
        if n:
            print(f"trimmed {whl.name}: {n} files, {size / 2**20:.1f} MiB uncompressed")
        kept.append(whl.name)
    tar_path = args.out / "wheels.tar.xz"
    with tarfile.open(tar_path, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for name in kept:
            tar.add(stage / name, arcname=f"wheels/{name}")
    (args.out / "wheels.txt").write_text("\n".join(kept) + "\n")
    for old in stage.glob("*.whl"):
        old.unlink()
    stage.rmdir()
    print(f"{len(kept)} wheels -> {tar_path} ({tar_path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
