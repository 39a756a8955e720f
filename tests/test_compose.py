"""Compose rendering: layouts over GPUs and hosts (`docker compose config` checks the files in
tests/test_docker_compose_up.py, with the Docker tests)."""

from pathlib import Path

import pytest
import yaml

from deploy.cli import main
from deploy.compose import HF_TOKEN_FILE, SUPERLINK_IMAGE, RenderOptions, render
from deploy.topology import Host, LayoutError, parse_gpus, plan
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

NODES = 20


def supernodes(document):
    return {name: s for name, s in document["services"].items() if name.startswith("supernode-")}


def node_config(service, part: str = "partition") -> str:
    """The node's partition (`partition-id=.. num-partitions=..`) or its training settings."""
    words = service["command"][service["command"].index("--node-config") + 1].split()
    return " ".join(words[:2] if part == "partition" else words[2:])


def devices_of(service):
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def gpu_of(service):
    devices = devices_of(service)
    return int(devices[0]["device_ids"][0].removeprefix("nvidia.com/gpu=")) if devices else None


@pytest.mark.parametrize("gpus", [1, 2, 3, 8])
def test_single_host_puts_node_i_on_gpu_i_mod_g(gpus):
    topology = plan(NODES, [Host("gpu-box", tuple(range(gpus)))], nodes_per_round=2)
    (document,) = render(topology).values()
    nodes = supernodes(document)
    assert sorted(nodes) == sorted(f"supernode-{i}" for i in range(NODES))
    for i in range(NODES):
        service = nodes[f"supernode-{i}"]
        assert node_config(service) == f"partition-id={i} num-partitions={NODES}"
        assert gpu_of(service) == i % gpus
        assert node_config(service, "training") == f'trainer-dir="/trainers" trainer-home="gpu{i % gpus}"'
        assert service["depends_on"][f"trainer-gpu{i % gpus}"] == {"condition": "service_healthy"}
        assert "HF_TOKEN" not in yaml.safe_dump(service)  # it loads no model
        assert service["command"][service["command"].index("--superlink") + 1] == "superlink:8000"
    assert {"setup", "superlink", "register-nodes", "serverapp", "model-fetch", "submit"} <= set(document["services"])
    trainers = {name: s for name, s in document["services"].items() if name.startswith("trainer-")}
    assert sorted(trainers) == sorted(f"trainer-gpu{g}" for g in range(gpus))
    for g in range(gpus):
        command = trainers[f"trainer-gpu{g}"]["command"]
        assert gpu_of(trainers[f"trainer-gpu{g}"]) == g
        assert command[command.index("--home") + 1] == f"gpu{g}"
        # The round's two sampled nodes find a trainer each on the host: 2 on one GPU, 1 on more.
        assert command[command.index("--count") + 1] == str(-(-2 // gpus))


def test_no_trainers_means_training_in_each_clientapp():
    (document,) = render(plan(NODES, [Host("gpu-box", (0,))], trainers=0)).values()
    assert not any(name.startswith("trainer-") for name in document["services"])
    for service in supernodes(document).values():
        assert node_config(service, "training") == 'lock-dir="/locks"'
        assert "gpu-locks:/locks" in service["volumes"] and service["secrets"] == ["hf_token"]  # it loads the model
    assert set(document["volumes"]) == {"superlink-state", "hf-cache", "gpu-locks"}


def test_explicit_gpu_ids_are_used_round_robin():
    topology = plan(NODES, [Host("gpu-box", parse_gpus("2,5"))])
    (document,) = render(topology).values()
    assert [gpu_of(supernodes(document)[f"supernode-{i}"]) for i in range(4)] == [2, 5, 2, 5]


def test_two_hosts_share_the_partitions_and_point_at_the_first():
    topology = plan(NODES, [Host("alpha", (0, 1)), Host("beta", (0, 1, 2))], superlink_address="10.0.0.5")
    documents = render(topology)
    alpha, beta = documents["alpha"], documents["beta"]
    assert "superlink" in alpha["services"] and "superlink" not in beta["services"]
    # Each host runs the trainers of its own GPUs, for its own nodes only.
    assert {n for n in alpha["services"] if n.startswith("trainer-")} == {"trainer-gpu0", "trainer-gpu1"}
    assert {n for n in beta["services"] if n.startswith("trainer-")} == {"trainer-gpu0", "trainer-gpu1", "trainer-gpu2"}
    assert "serverapp" not in beta["services"] and "model-fetch" in beta["services"]
    partitions = [node_config(s) for d in (alpha, beta) for s in supernodes(d).values()]
    assert sorted(partitions) == sorted(f"partition-id={i} num-partitions={NODES}" for i in range(NODES))
    for service in supernodes(beta).values():
        assert service["command"][service["command"].index("--superlink") + 1] == "10.0.0.5:8000"
        assert "superlink" not in service["depends_on"]
    assert len(supernodes(alpha)) == 8 and len(supernodes(beta)) == 12  # 2 of every 5 slots are alpha's
    superlink_cert = alpha["services"]["setup"]["command"]
    assert "10.0.0.5" in superlink_cert and "beta" in superlink_cert


def test_insecure_is_an_explicit_opt_out():
    (secure,) = render(plan(2, [Host("h")])).values()
    (insecure,) = render(plan(2, [Host("h")]), RenderOptions(insecure=True)).values()
    assert "--ssl-certfile" in secure["services"]["superlink"]["command"]
    assert "--insecure" not in yaml.safe_dump(secure)
    assert "--insecure" in insecure["services"]["superlink"]["command"]
    assert "--certs" not in insecure["services"]["setup"]["command"]
    assert "register-nodes" not in insecure["services"]


@pytest.mark.parametrize("request_kind", ["nvidia", "cdi"])
def test_each_gpu_service_asks_for_its_one_gpu_the_chosen_way(request_kind):
    """NVIDIA's runtime by index; CDI by the spec's device name (compose requires a capability
    there too, which the engine's CDI driver ignores)."""
    options = RenderOptions(gpu_request=request_kind)
    (document,) = render(plan(NODES, [Host("gpu-box", (0, 1))]), options).values()
    gpu_services = {n: s for n, s in document["services"].items() if n.startswith(("supernode-", "trainer-"))}
    assert len(gpu_services) == NODES + 2
    for name, service in gpu_services.items():
        (device,) = devices_of(service)
        gpu = gpu_of(service)
        if request_kind == "cdi":
            assert device == {"driver": "cdi", "device_ids": [f"nvidia.com/gpu={gpu}"], "capabilities": ["gpu"]}, name
        else:
            assert device == {"driver": "nvidia", "device_ids": [str(gpu)], "capabilities": ["gpu"]}, name
    assert not any(
        devices_of(document["services"][n]) for n in ("superlink", "serverapp", "submit", "model-fetch", "setup")
    )


def test_gpu_request_reaches_the_rendered_file_from_the_command_line(tmp_path):
    assert main(["--app", str(ROOT), "render", "--gpus", "0,1", "--gpu-request", "cdi", "--out", str(tmp_path)]) == 0
    document = yaml.safe_load((tmp_path / "compose.yaml").read_text())
    assert devices_of(document["services"]["supernode-1"]) == [
        {"driver": "cdi", "device_ids": ["nvidia.com/gpu=1"], "capabilities": ["gpu"]}
    ]


def test_the_docker_sdk_backend_translates_every_key_we_render():
    from deploy.backends.docker import HANDLED_KEYS

    documents = render(plan(NODES, [Host("a", (0, 1)), Host("b", (0,))]))
    documents["cpu"] = render(plan(NODES, [Host("cpu")]), RenderOptions(insecure=True))["cpu"]
    used = {key for d in documents.values() for s in d["services"].values() for key in s}
    assert used <= HANDLED_KEYS


def every_layout() -> list[dict]:
    """GPU hosts with and without warm trainers, two hosts, the CPU without TLS."""
    return [
        *render(plan(NODES, [Host("a", (0, 1)), Host("b", (0,))])).values(),
        *render(plan(NODES, [Host("gpu", (0,))], trainers=0)).values(),
        *render(plan(NODES, [Host("cpu")]), RenderOptions(insecure=True)).values(),
    ]


def test_every_service_runs_without_privileges_on_a_read_only_root():
    for document in every_layout():
        for name, service in document["services"].items():
            assert service["cap_drop"] == ["ALL"] and service["security_opt"] == ["no-new-privileges:true"], name
            assert service["read_only"] is True and service["tmpfs"] == [
                "/tmp:exec",
                "/home/flwr:exec,uid=1000,gid=1000",
            ], name
            if name == "setup":  # it hands the host's folders to uid 1000: root, with only what that takes
                assert service["user"] == "0:0" and service["cap_add"] == ["CHOWN", "DAC_OVERRIDE"]
            else:
                assert service["user"] == "1000:1000" and "cap_add" not in service, name


def test_the_hf_token_is_a_secret_file_of_the_services_that_download_only():
    for document in every_layout():
        assert document["secrets"] == {"hf_token": {"file": HF_TOKEN_FILE}}
        for name, service in document["services"].items():
            in_process = name.startswith("supernode-") and "lock-dir" in node_config(service, "training")
            downloads = name in ("model-fetch", "serverapp") or name.startswith("trainer-") or in_process
            environment = service.get("environment", {})
            assert "${" not in yaml.safe_dump(environment), name  # nothing comes from the user's shell
            assert service.get("secrets") == (["hf_token"] if downloads else None), name
            assert environment.get("HF_TOKEN_PATH") == ("/run/secrets/hf_token" if downloads else None), name


@pytest.mark.parametrize(
    "volume, config",
    [("./demo:/demo:ro", "./demo/tiny/config.json"), ("/srv/models/tiny/:/demo/tiny", "/srv/models/tiny/config.json")],
)
def test_the_serverapp_mounts_no_data_and_no_weights(volume, config):
    """Of a local model, config.json alone, the one file the initial adapter is built from."""
    options = RenderOptions(extra_volumes=(volume,), model="/elsewhere", run_config='model.name="/demo/tiny"')
    (document,) = render(plan(NODES, [Host("h")]), options).values()
    tls = ["./.deploy/certs/ca.crt:/certs/ca.crt:ro", "./.deploy/certs/superexec.secret:/certs/superexec.secret:ro"]
    assert document["services"]["serverapp"]["volumes"] == [
        "./results:/app/results",
        *tls,
        f"{config}:/demo/tiny/config.json:ro",
    ]
    (hub,) = render(plan(NODES, [Host("h")])).values()  # a hub model: it fetches config.json itself
    assert hub["services"]["serverapp"]["volumes"] == ["./results:/app/results", *tls]


def test_each_service_sees_only_the_tls_and_key_files_it_needs():
    """The SuperLink alone holds its key; it and the ServerApp the SuperExec secret; no
    container but `setup` sees the CA key; a SuperNode sees its own private key, and
    register-nodes the public keys only. Nothing binds the TLS or keys folder whole but setup."""
    (document,) = render(plan(NODES, [Host("h", (0,))])).values()
    seen = {
        name: {v.split(":")[0] for v in service.get("volumes", []) if v.startswith("./.deploy/")}
        for name, service in document["services"].items()
    }
    assert seen.pop("setup") == {"./.deploy/certs", "./.deploy/keys"}
    tls = {name: {Path(p).name for p in paths if p.startswith("./.deploy/certs/")} for name, paths in seen.items()}
    assert tls.pop("superlink") == {"ca.crt", "superlink.crt", "superlink.key", "superexec.secret"}
    assert tls.pop("serverapp") == {"ca.crt", "superexec.secret"}
    clients = {"register-nodes", "submit", *(f"supernode-{i}" for i in range(NODES))}
    assert tls == {name: {"ca.crt"} if name in clients else set() for name in tls}
    keys = {name: {p for p in paths if p.startswith("./.deploy/keys")} for name, paths in seen.items()}
    assert keys.pop("register-nodes") == {f"./.deploy/keys/supernode-{i}.pub" for i in range(NODES)}
    for i in range(NODES):
        assert keys.pop(f"supernode-{i}") == {f"./.deploy/keys/supernode-{i}.key"}
    assert all(not paths for paths in keys.values())


def assert_refused(reliability, what: str, pattern: str, call, *args, **kwargs) -> None:
    """`call` stops with one LayoutError line matching `pattern`: a bad input refused."""
    with pytest.raises(LayoutError, match=pattern) as err:
        call(*args, **kwargs)
    assert "\n" not in str(err.value)
    reliability.record("bad input", what, f"refused: {err.value}")


def test_layout_errors_are_one_line(reliability):
    assert_refused(
        reliability,
        "--gpus '0,x'",
        r"^--gpus '0,x': expected GPU ids such as 0,1,2,3 \(or '' for the CPU\)$",
        parse_gpus,
        "0,x",
    )
    assert_refused(
        reliability, "--gpus ','", r"^--gpus ',': expected GPU ids", parse_gpus, ","
    )  # once silently the CPU
    assert parse_gpus("") == parse_gpus(" ") == ()
    assert_refused(reliability, "--host a --host a", "distinct", plan, NODES, [Host("a"), Host("a")])
    for bad in ("a;rm -rf ~", "b$(id)", "../../escaped=1", "two words", "-lead"):
        assert_refused(
            reliability,
            f"--host {bad!r}",
            r"^--host .*: expected NAME or NAME=GPU,GPU,\.\.\., NAME a host name or IP",
            Host.parse,
            bad,
        )
    assert Host.parse("gpu-box-2.example.org=0,1") == Host("gpu-box-2.example.org", (0, 1))
    assert Host.parse("10.0.0.5").name == "10.0.0.5"
    for bad in ("not a host!!:::", "10.0.0.5:9999"):
        assert_refused(
            reliability,
            f"--superlink-address {bad!r}",
            r"^--superlink-address .*: expected a host name, an IPv4 address or an IPv6 address",
            plan,
            NODES,
            [Host("a")],
            superlink_address=bad,
        )


def test_committed_compose_yaml_is_the_rendered_default(tmp_path):
    """compose.yaml is `deploy render --gpus 0`: one CUDA host, 20 SuperNodes on GPU 0."""
    assert main(["--app", str(ROOT), "render", "--gpus", "0", "--out", str(tmp_path)]) == 0
    assert (ROOT / "compose.yaml").read_text() == (tmp_path / "compose.yaml").read_text()


def test_every_service_says_how_to_build_its_image():
    """Plain `docker compose up` on a fresh clone builds our images instead of pulling them."""
    for document in render(plan(NODES, [Host("a", (0, 1)), Host("b", (0,))])).values():
        for name, service in document["services"].items():
            target = "superlink" if service["image"] == SUPERLINK_IMAGE else "app"
            assert service["build"] == {"context": ".", "dockerfile": "docker/Dockerfile", "target": target}, name
