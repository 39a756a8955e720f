"""Intruders against a real SuperLink as the Docker stack runs it: TLS from our private CA and
SuperNode authentication (`--enable-supernode-auth`), with one node key registered.

Three SuperNodes try to join: the registered one, one with a valid TLS chain (it trusts our
CA) but a key nobody registered, and one speaking plain HTTP. A `flwr` user without TLS tries
the Control API. Only the registered node may ever be online, and a real run may only sample
it: the ServerApp samples from the SuperLink's node list, which the others never enter.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from deploy.backends.process import ProcessDeployment, free_ports
from deploy.errors import DeployError
from deploy.flwr_cli import Connection, FlwrCli, register_connection
from deploy.project import resolve_run_config
from deploy.tls import TlsFiles, make_certificates, make_node_keys
from deploy.topology import SUPERNODE_ENV, Host, plan
from tests.conftest import ROOT

# timeout: a test and its fixtures' setup; ~40 s at most measured on 2 busy cores
pytestmark = [pytest.mark.deployment, pytest.mark.timeout(120)]
DEADLINE = 60  # seconds any one wait may take
NODE_CONFIG = "partition-id=0 num-partitions=1"  # all three claim the same: only their keys differ
REFUSED_KEY = "[code: 2004] Failed to activate SuperNode."  # the unregistered SuperNode's last word
PLAIN_RETRY = "Connection attempt failed"  # the plain-HTTP SuperNode's, again and again
UNAVAILABLE = "Connection to the SuperLink is unavailable."  # `flwr` over plain HTTP


@dataclass
class Federation:
    deployment: ProcessDeployment
    tls: FlwrCli  # a `flwr` user with the CA certificate
    plain: FlwrCli  # the same address with `insecure = true`
    keys: dict[str, Path]

    def log(self, name: str) -> str:
        return (self.deployment.workdir / "logs" / f"{name}.log").read_text()

    def node_list(self) -> list[dict]:
        """Every node the SuperLink knows, whatever its state: `flwr supernode ls` over TLS."""
        nodes = self.tls.nodes()
        assert nodes is not None, "the SuperLink does not answer over TLS"
        return nodes

    def registered_node_id(self) -> int:
        return int(re.search(r"SuperNode ID: (\d+)", self.log("registered")).group(1))


def superlink_argv(certs: TlsFiles, port: int, database: Path) -> list[str]:
    """compose's SuperLink, but the ServerApp runs under its own SuperExec: nothing else to start."""
    return [
        "flower-superlink",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(database),
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.cert),
        "--ssl-keyfile",
        str(certs.key),
        "--enable-supernode-auth",
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]


def supernode_argv(address: str, port: int, transport: list[str]) -> list[str]:
    return ["flower-supernode", "--superlink", address, "--node-config", NODE_CONFIG, "--port", str(port), *transport]


def tls_node(certs: TlsFiles, public_key: Path) -> list[str]:
    """What a SuperNode of the stack gets: the CA to trust and its own private key."""
    return [
        "--root-certificates",
        str(certs.ca_cert),
        "--auth-supernode-private-key",
        str(public_key.with_suffix(".key")),
    ]


def wait_for(what: str, condition, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Started in a ProcessDeployment (its process groups and its teardown, which also reaches
    the SuperExec's ServerApp and ClientApps), but by hand: its own up() serves plain HTTP."""
    workdir = tmp_path_factory.mktemp("intrusion")
    certs = make_certificates(workdir / "certs", ["superlink"])
    keys = make_node_keys(workdir / "keys", ["registered", "unregistered"])
    port, *node_ports = free_ports(4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    deployment = ProcessDeployment(plan(1, [Host("localhost")], superlink_port=port, trainers=0), workdir, env)
    address, flwr_home = deployment.connection.address, workdir / "flwr-home"
    register_connection(flwr_home, Connection("tls", address, certs.ca_cert))
    register_connection(flwr_home, Connection("plain", address))
    clis = [FlwrCli(deployment.bin_dir / "flwr", flwr_home, name, deployment.env) for name in ("tls", "plain")]
    started = Federation(deployment, *clis, keys)
    nodes = {**{name: tls_node(certs, public_key) for name, public_key in keys.items()}, "plain-http": ["--insecure"]}
    (workdir / "logs").mkdir()
    try:
        superlink_home = {"FLWR_HOME": str(workdir / "superlink-home")}
        deployment.start("superlink", superlink_argv(certs, port, workdir / "superlink.db"), superlink_home)
        started.tls.wait_for_nodes(0, DEADLINE, deployment.check_alive)
        started.tls.register_node(keys["registered"])
        for (name, transport), node_port in zip(nodes.items(), node_ports):
            node_env = {"FLWR_HOME": str(workdir / name), "CUDA_VISIBLE_DEVICES": "", **SUPERNODE_ENV}
            deployment.start(name, supernode_argv(address, node_port, transport), node_env)
        started.tls.wait_for_nodes(1, DEADLINE, lambda: None)
        # Settled: each intruder has been turned away at least once.
        wait_for("the unregistered SuperNode's refusal", lambda: REFUSED_KEY in started.log("unregistered"))
        wait_for("the plain-HTTP SuperNode's second try", lambda: started.log("plain-http").count(PLAIN_RETRY) >= 2)
        yield started
    finally:
        deployment.down()


def test_a_supernode_with_an_unregistered_key_is_refused_and_never_online(federation, reliability):
    exit_code = psutil.Process(federation.deployment.pid_of("unregistered")).wait(DEADLINE)
    log = federation.log("unregistered")
    assert exit_code == 1 and REFUSED_KEY in log and "SuperNode ID:" not in log, log
    assert "No SuperNode found with the given public key." in federation.log("superlink")
    # The SuperLink's whole node list, online or not: only the registered key ever got a node.
    (node,) = federation.node_list()
    assert (int(node["node-id"]), node["status"]) == (federation.registered_node_id(), "online")
    reliability.record(
        "intrusion",
        "SuperNode with a valid TLS certificate chain but an unregistered key",
        f"refused at activation; it exits with code {exit_code}: `{REFUSED_KEY}`; never in the SuperLink's node list, "
        "so never online and never sampled",
    )


def test_a_plain_http_supernode_never_joins(federation, reliability):
    """It retries for ever, cut off each time in the TLS handshake; the SuperLink logs nothing."""
    log = federation.log("plain-http")
    assert log.count(PLAIN_RETRY) >= 2 and "SuperNode ID:" not in log
    assert psutil.Process(federation.deployment.pid_of("plain-http")).is_running()
    assert [int(n["node-id"]) for n in federation.node_list()] == [federation.registered_node_id()]
    reliability.record(
        "intrusion",
        "SuperNode speaking plain HTTP (`--insecure`) to the TLS SuperLink",
        f"refused in the TLS handshake; it retries (`{PLAIN_RETRY}`) and is never in the SuperLink's node list",
    )


def test_the_control_api_refuses_plain_http(federation, reliability):
    assert federation.tls.online_nodes() == 1  # the SuperLink answers, over TLS
    assert federation.plain.online_nodes() is None
    reply = federation.plain.ask("ls", federation.plain.connection)
    assert reply["success"] is False and UNAVAILABLE in reply["error-message"]
    # Nor can a key be registered without TLS, nor does any plain HTTP request get an answer.
    with pytest.raises(DeployError, match=f"^registering unregistered.pub failed: .*{UNAVAILABLE}"):
        federation.plain.register_node(federation.keys["unregistered"])
    request = urllib.request.Request(f"http://{federation.deployment.connection.address}/v1/control/list-nodes", b"{}")
    with pytest.raises((ConnectionError, urllib.error.URLError)) as raw:
        urllib.request.urlopen(request, timeout=10)
    reliability.record(
        "intrusion",
        "`flwr` with `insecure = true` (`flwr supernode ls`, `flwr ls`, `flwr supernode register`) "
        "and a raw plain-HTTP POST to the Control API",
        f"refused: `flwr` says `{UNAVAILABLE}`; the POST gets no HTTP answer ({type(raw.value).__name__})",
    )


def test_a_run_samples_only_the_registered_node(federation, demo, tmp_path, reliability):
    """With fraction-train 1.0 the strategy trains every node the SuperLink lists: one client
    means one node was available, and its id is the registered node's."""
    overrides = {
        **demo.run_config(),
        "results.dir": str(tmp_path),
        "num-server-rounds": 1,
        "leaderboard": False,
        "static.dataset.num-partitions": 1,
        "static.strategy.fraction-train": 1.0,
    }
    sent, _ = resolve_run_config(ROOT, overrides)
    run_id = federation.tls.submit(ROOT, sent, tmp_path)
    status, details = federation.tls.wait_finished(run_id, timeout=90)
    assert status == "finished:completed", details
    (run_dir,) = tmp_path.glob("*-run*")
    (round_1,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [c["node-id"] for c in round_1["clients"]] == [federation.registered_node_id()]
    assert round_1["failed"] == [] and round_1["rejected"] == []
    reliability.record(
        "intrusion",
        "a 1-round run, strategy.fraction-train 1.0, while the unregistered and the plain-HTTP SuperNode try to join",
        f"{status}; it sampled {len(round_1['clients'])} node, the registered one; no intruder in metrics.jsonl",
    )
