"""Separate Docker engines on this machine, each in network, mount and UTS namespaces of its own,
joined by a private LAN: what tests/test_engines.py runs kits and a swarm on.

Engines in namespaces rather than Docker-in-Docker containers: they run this machine's own
dockerd, containerd and runc as they are, with nothing to build and no privileged container on
the host's engine, and each has its own IP address, hostname, iptables, image store and
containers. The host's engine is not touched but for `docker save`. Images reach the engines as
one `docker save` archive that each engine loads: nothing here can reach a registry, and no
registry image is at hand to run one.

The LAN is a bridge inside a namespace of its own; the host joins it through one veth pair
(HOST_ADDRESS), so the test's own `flwr` reaches the SuperLink as a user's would. Everything is
created by `Lan` and `Engine` and removed by their `remove`, which tolerates a half-made state,
so a fixture's finalizer leaves nothing behind whatever failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import docker

SUBNET = "192.168.213"  # private, and outside Swarm's default overlay pool (10.0.0.0/8)
HOST_ADDRESS = f"{SUBNET}.1"
LAN_NS = "fte-lan"
HOST_LINK = "fte-host"


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(command, capture_output=True, text=True, check=check)


class Lan:
    def __init__(self) -> None:
        self.remove()  # what an interrupted earlier run left
        ip("netns", "add", LAN_NS)
        ip("link", "add", "br0", "type", "bridge", ns=LAN_NS)
        ip("link", "set", "br0", "up", ns=LAN_NS)
        ip("link", "add", HOST_LINK, "type", "veth", "peer", "name", "to-host", "netns", LAN_NS)
        ip("link", "set", "to-host", "master", "br0", "up", ns=LAN_NS)
        ip("addr", "add", f"{HOST_ADDRESS}/24", "dev", HOST_LINK)
        ip("link", "set", HOST_LINK, "up")

    def plug(self, ns: str, address: str) -> None:
        """A veth from the bridge to `ns`'s eth0, holding `address`."""
        port = f"to-{ns}"[:15]
        ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=LAN_NS)
        ip("link", "set", port, "master", "br0", "up", ns=LAN_NS)
        ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
        ip("link", "set", "eth0", "up", ns=ns)
        ip("link", "set", "lo", "up", ns=ns)

    @staticmethod
    def remove() -> None:
        """Deleting the namespace deletes the bridge and every veth (the host's end with its peer)."""
        ip("netns", "del", LAN_NS, check=False)
        ip("link", "del", HOST_LINK, check=False)


class Engine:
    """dockerd (with the containerd it starts itself) in namespaces of its own; its hostname is
    its name, its data under `folder` (short: unix socket paths must stay under 108 bytes)."""

    def __init__(self, name: str, index: int, folder: Path, lan: Lan) -> None:
        self.name, self.ns, self.address = name, f"fte-{name}", f"{SUBNET}.{10 + index}"
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.process: subprocess.Popen | None = None
        self.lan = lan

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=600)

    def start(self, timeout: float = 120) -> None:
        if ip("netns", "pids", self.ns, check=False).returncode != 0:
            ip("netns", "add", self.ns)
            self.lan.plug(self.ns, self.address)
        ip("link", "set", "eth0", "up", ns=self.ns)  # back on the LAN after `lose`
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "data-root": str(self.folder / "data"),
            "exec-root": str(self.folder / "x"),
            "pidfile": str(self.folder / "docker.pid"),
            "hosts": [self.url],
            "cgroup-parent": f"/fte-{self.name}",
            "storage-driver": "overlay2",
            "log-level": "warn",
        }
        (self.folder / "daemon.json").write_text(json.dumps(config))
        # /run/containerd hidden: dockerd would use the host's containerd found there, not its own.
        # `ip netns exec` mounts a fresh /sys for the namespace, without the cgroup hierarchies.
        script = " && ".join(
            [
                f"hostname {self.name}",
                "mount -t tmpfs tmpfs /run/containerd",
                *_cgroup_mounts(),
                f"exec dockerd --config-file {self.folder / 'daemon.json'}",
            ]
        )
        log = open(self.folder / "dockerd.log", "ab")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--", "sh", "-c", script],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd of {self.name} exited: {self.log_tail()}")
            try:
                self.client().ping()
                return
            except docker.errors.DockerException:
                time.sleep(0.5)
        raise RuntimeError(f"dockerd of {self.name} did not answer in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        path = self.folder / "dockerd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def load(self, archive: Path) -> None:
        with open(archive, "rb") as data:
            self.client().images.load(data)

    def lose(self) -> None:
        """The machine drops off the network at once, then everything on it dies: no goodbye reaches
        anyone, so the SuperLink learns of it only from missed heartbeats."""
        ip("link", "set", "eth0", "down", ns=self.ns)
        for container in self.client().containers.list():
            container.kill()
        self.stop()

    def stop(self, timeout: float = 60) -> None:
        """dockerd stops its containers and its containerd on SIGTERM."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def remove(self) -> None:
        """Also after a failure: every container, then every process left in its namespace
        (a shim whose daemon died), the namespace and the folder."""
        if self.process is not None and self.process.poll() is None:
            try:
                for container in self.client().containers.list():
                    container.kill()
            except docker.errors.DockerException:
                pass
        self.stop()
        for pid in ip("netns", "pids", self.ns, check=False).stdout.split() + self._cgroup_pids():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        for group in sorted(self._cgroups(), key=lambda p: len(p.parts), reverse=True):
            for _ in range(50):  # a killed process leaves its cgroup a moment later
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        ip("netns", "del", self.ns, check=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _cgroups(self) -> list[Path]:
        """Its containers' cgroups (`cgroup-parent`): their processes live in namespaces of their
        own, so only these find one whose shim died with the daemon."""
        roots = Path("/sys/fs/cgroup").glob(f"*/fte-{self.name}")
        return [group for root in roots for group in (root, *root.rglob("*")) if group.is_dir()]

    def _cgroup_pids(self) -> list[str]:
        pids = []
        for group in self._cgroups():
            try:
                pids += (group / "cgroup.procs").read_text().split()
            except OSError:  # gone meanwhile
                pass
        return pids


def _cgroup_mounts() -> list[str]:
    """The host's cgroup mounts, as shell commands that mount the same hierarchies again."""
    commands = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, kind, options, *_ = line.split()
        if point.startswith("/sys/fs/cgroup") and kind in ("tmpfs", "cgroup", "cgroup2"):
            commands.append(f"mkdir -p {point} && mount -t {kind} -o {options} {kind} {point}")
    return commands
