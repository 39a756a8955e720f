"""The Swarm stack rendering (`deploy render --engine swarm`) and the node labelling it relies on,
for a GPU and a CPU layout; the stack is checked against compose's own per-host documents."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.backends.swarm import SwarmNode, node_labels
from deploy.cli import main
from deploy.compose import HF_TOKEN, RenderOptions, render
from deploy.errors import DeployError
from deploy.swarm import PLACEMENT_LABEL, STACK_FILE
from deploy.swarm import render as render_stack
from deploy.topology import Host, plan
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)

NODES = 20
LAYOUTS = {
    "gpus": (Host("gpu-a", (0,)), Host("gpu-b", (0, 1)), Host("cpu-c")),
    "cpu": (Host("a"), Host("b"), Host("c")),
}
ONE_SHOTS = {"register-nodes", "model-fetch"}


def stack(layout: str, **how) -> tuple[dict, dict]:
    topology = plan(NODES, LAYOUTS[layout], superlink_address="10.0.0.5", nodes_per_round=2)
    return render_stack(topology, RenderOptions(), **how), render(topology)


def host_of(service: dict) -> str:
    (constraint,) = service["deploy"]["placement"]["constraints"]
    label, _, host = constraint.partition(" == ")
    assert label == f"node.labels.{PLACEMENT_LABEL}"
    return host


def secrets_of(service: dict) -> dict[str, str]:
    return {ref["source"]: ref["target"] for ref in service.get("secrets", []) if isinstance(ref, dict)}


def stack_name(name: str, host: str) -> str:
    """A compose service's name in the stack: the host's own services carry the host's name."""
    own = name in {"superlink", "register-nodes", "serverapp", "submit"} or name.startswith("supernode-")
    return name if own else f"{name}-{host}"


@pytest.mark.unit
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_compose_service_runs_on_its_host_with_the_same_command(layout):
    """One stack for all hosts: compose's services of each host (its `setup` aside), placed by
    label, named after the host where every host has one, dialling the SuperLink by its name."""
    document, per_host = stack(layout)
    expected = {}
    for host, compose in per_host.items():
        for name, service in compose["services"].items():
            if name != "setup":
                expected[stack_name(name, host)] = (host, service)
    assert set(document["services"]) == set(expected)
    for name, service in document["services"].items():
        host, compose = expected[name]
        assert host_of(service) == host, name
        assert service["image"] == compose["image"] and "build" not in service
        # The same command, but every host dials the SuperLink's service name on the overlay network.
        command = [arg.replace("10.0.0.5:8000", "superlink:8000") for arg in compose["command"]]
        assert service["command"] == command, name
        if "--superlink" in command:
            assert command[command.index("--superlink") + 1] == "superlink:8000"
        assert service.get("healthcheck") == compose.get("healthcheck")
        assert {k: service.get(k) for k in ("user", "cap_drop", "cap_add", "read_only", "init")} == {
            k: compose.get(k) for k in ("user", "cap_drop", "cap_add", "read_only", "init")
        }
        assert not {"depends_on", "restart", "security_opt", "tmpfs", "container_name"} & set(service), name
        # tmpfs become anonymous volumes (Swarm mounts tmpfs noexec); no TLS file is bound.
        assert {"/tmp", "/home/flwr"} <= set(service["volumes"])
        assert all(isinstance(v, str) and ".deploy" not in v for v in service["volumes"]), name
        assert service["deploy"]["endpoint_mode"] == "dnsrr"
        condition = service["deploy"]["restart_policy"]["condition"]
        one_shot = name.removesuffix(f"-{host}") in ONE_SHOTS
        assert condition == ("none" if name == "submit" else "on-failure" if one_shot else "any"), name
    assert document["services"]["serverapp"]["volumes"][0] == "results:/app/results"


@pytest.mark.unit
@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_the_superlink_publishes_a_port_on_its_own_host(layout):
    document, _ = stack(layout)
    published = {name: s["ports"] for name, s in document["services"].items() if "ports" in s}
    assert published == {"superlink": [{"target": 8000, "published": 8000, "protocol": "tcp", "mode": "host"}]}
    assert host_of(document["services"]["superlink"]) == LAYOUTS[layout][0].name
    assert document["networks"] == {"default": {"driver": "overlay", "driver_opts": {"encrypted": ""}}}
    plain, _ = stack(layout, overlay="plain")
    assert plain["networks"] == {"default": {"driver": "overlay"}}


@pytest.mark.unit
def test_each_service_gets_only_its_own_secrets_and_none_the_ca_key():
    document, _ = stack("gpus")
    services = document["services"]
    seen = {name: secrets_of(service) for name, service in services.items()}
    assert seen.pop("superlink") == {
        name: f"/certs/{name}" for name in ("ca.crt", "superlink.crt", "superlink.key", "superexec.secret")
    }
    assert seen.pop("serverapp") == {"ca.crt": "/certs/ca.crt", "superexec.secret": "/certs/superexec.secret"}
    assert seen.pop("submit") == {"ca.crt": "/certs/ca.crt"}
    pubs = {f"supernode-{i}.pub": f"/keys/supernode-{i}.pub" for i in range(NODES)}
    assert seen.pop("register-nodes") == {"ca.crt": "/certs/ca.crt", **pubs}
    for i in range(NODES):
        assert seen.pop(f"supernode-{i}") == {"ca.crt": "/certs/ca.crt", f"supernode-{i}.key": "/keys/node.key"}
    assert seen and all(not s for s in seen.values())  # trainers and model-fetch: none
    for service in services.values():
        for ref in service.get("secrets", []):
            assert (ref["uid"], ref["gid"], ref["mode"]) == ("1000", "1000", 0o400)
    files = {name: spec["file"] for name, spec in document["secrets"].items()}
    assert "ca.key" not in files and HF_TOKEN not in files  # no token without one
    assert all(Path(path).name == name for name, path in files.items())
    assert not any("HF_TOKEN_PATH" in s.get("environment", {}) for s in services.values())


@pytest.mark.unit
def test_with_a_token_the_services_that_download_get_it_as_a_secret():
    document, per_host = stack("gpus", hub_token=True)
    assert document["secrets"][HF_TOKEN] == {"file": "${HF_TOKEN_FILE}"}
    with_token = {name for name, s in document["services"].items() if HF_TOKEN in s.get("secrets", [])}
    in_compose = {
        stack_name(name, host)
        for host, compose in per_host.items()
        for name, s in compose["services"].items()
        if HF_TOKEN in s.get("secrets", [])
    }
    assert with_token == in_compose and "serverapp" in with_token and "trainer-gpu1-gpu-b" in with_token
    assert all(
        document["services"][name]["environment"]["HF_TOKEN_PATH"] == "/run/secrets/hf_token" for name in with_token
    )


@pytest.mark.unit
def test_gpus_are_pinned_through_the_environment_and_cpu_hosts_get_none():
    document, per_host = stack("gpus")
    for host, compose in per_host.items():
        for name, service in compose["services"].items():
            if name == "setup":
                continue
            devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            swarm = document["services"][stack_name(name, host)]
            visible = swarm.get("environment", {}).get("NVIDIA_VISIBLE_DEVICES")
            assert visible == (devices[0]["device_ids"][0] if devices else None), name
            assert "resources" not in swarm["deploy"]
    assert document["services"]["supernode-2"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == "1"  # slot 2: gpu-b's GPU 1
    cpu, _ = stack("cpu")
    assert not any("NVIDIA_VISIBLE_DEVICES" in s.get("environment", {}) for s in cpu["services"].values())


@pytest.mark.unit
def test_a_server_host_runs_the_superlink_and_serverapp_and_no_supernode():
    topology = plan(NODES, (Host.server("hub"), Host("b"), Host("c")), nodes_per_round=2)
    assert {node.host for node in topology.nodes} == {"b", "c"} and len(topology.nodes_on("b")) == NODES // 2
    on_hub = {name for name, s in render_stack(topology, RenderOptions())["services"].items() if host_of(s) == "hub"}
    assert on_hub == {"superlink", "register-nodes", "serverapp", "submit"}
    assert set(render(topology)["hub"]["services"]) == {"setup", "superlink", "register-nodes", "serverapp", "submit"}


@pytest.mark.unit
def test_a_host_named_by_its_ip_gets_service_names_swarm_accepts():
    topology = plan(NODES, (Host("10.0.0.5"), Host("10.0.0.6")), nodes_per_round=2)
    document = render_stack(topology, RenderOptions())
    assert {"model-fetch-10-0-0-6", "trainer-cpu-10-0-0-5"} <= set(document["services"])
    assert host_of(document["services"]["trainer-cpu-10-0-0-5"]) == "10.0.0.5"


@pytest.mark.unit
def test_render_writes_the_stack_and_the_secrets_files_it_names(tmp_path, capsys):
    argv = ["render", "--engine", "swarm", "--host", "a", "--host", "b=0", "--superlink-address", "10.0.0.5"]
    assert main(["--app", str(ROOT), *argv, "--dir", str(tmp_path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"docker node update --label-add {PLACEMENT_LABEL}=b NODE" in out
    document = yaml.safe_load((tmp_path / STACK_FILE).read_text())
    for name, spec in document["secrets"].items():
        assert (tmp_path / spec["file"]).is_file(), name


@pytest.mark.parametrize(
    "argv, setting",
    [
        (["--insecure"], "--insecure"),
        (["--gpu-request", "cdi"], "--gpu-request cdi"),
        (["--host", "gpu_a"], "--host"),
        (["--server-host", "hub", "--host", "hub"], "names must be distinct"),
        (["--server-host", "hub=0", "--host", "b"], "--server-host 'hub=0'"),
    ],
)
@pytest.mark.unit
def test_a_bad_request_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, argv, setting):
    hosts = [] if "--host" in argv else ["--host", "a=0", "--host", "b"]
    code = main(
        [
            "--app",
            str(ROOT),
            "render",
            "--engine",
            "swarm",
            *hosts,
            *argv,
            "--dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and setting in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, setting",
    [
        (["up", "--build"], "--build"),
        (["up", "--backend", "process"], "--backend process"),
        (["status", "--insecure"], "--insecure"),
        (["down", "--gpu-request", "cdi"], "--gpu-request cdi"),
    ],
)
@pytest.mark.unit
def test_up_status_and_down_refuse_what_swarm_cannot_do_before_asking_an_engine(tmp_path, capsys, argv, setting):
    hosts = ["--host", "a=0", "--host", "b", "--dir", str(tmp_path)]
    code = main(["--app", str(ROOT), argv[0], "--engine", "swarm", *argv[1:], *hosts])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and setting in err, err
    assert list(tmp_path.iterdir()) == []


def node(name: str, **labels: str) -> SwarmNode:
    return SwarmNode(f"id-{name}", name, labels)


@pytest.mark.unit
def test_nodes_are_found_by_label_then_hostname_and_the_rest_named():
    nodes = [node("mgr", **{PLACEMENT_LABEL: "a"}), node("B"), node("worker-7")]
    assert node_labels(nodes, ["a", "b", "c"]) == ({"id-B": "b"}, ["c"])
    assert node_labels([node("laptop")], ["localhost"]) == ({"id-laptop": "localhost"}, [])  # one node, one host
    assert node_labels([node("x"), node("y")], ["localhost"]) == ({}, ["localhost"])
    twice = [node("x", **{PLACEMENT_LABEL: "a"}), node("y", **{PLACEMENT_LABEL: "a"})]
    with pytest.raises(DeployError, match=f"--host a: nodes x, y are all labelled {PLACEMENT_LABEL}=a"):
        node_labels(twice, ["a"])


@pytest.mark.docker
def test_docker_stack_config_accepts_the_stack(tmp_path, docker_engine):
    """The CLI's own reading of the file, as `docker stack deploy` does before it creates anything."""
    argv = ["render", "--engine", "swarm", "--host", "a", "--host", "b=0,1", "--dir", str(tmp_path)]
    assert main(["--app", str(ROOT), *argv, "--out", str(tmp_path)]) == 0
    done = subprocess.run(["docker", "stack", "config", "-c", STACK_FILE], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Ignoring" not in done.stderr and yaml.safe_load(done.stdout)["services"].keys() >= {"superlink"}
