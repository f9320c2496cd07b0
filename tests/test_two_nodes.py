"""A real two-node Ray cluster on loopback (`ray start --head`, `ray start --address`).

One study of one 2-rank trial (`python -m ray_cifar.train`'s DDP path), data and output given as file:// URIs,
the ranks spread over the nodes (train.placement_strategy=SPREAD):
- its epochs before the loss have one rank on each node: their rows name both nodes;
- after its second epoch every process of the second node is SIGKILLed (the node is lost): Ray Train
  restarts the worker group on what is left (SPREAD is a preference, not a rule) from the last
  checkpoint, and the study still finishes with no epoch lost or recorded twice.
Both nodes are `ray start --block` processes this test starts; it ends them, and only them, by pid.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import TINY_MODEL
from ray_cifar import console
from ray_cifar.results import ResultsLog
from processes import descendants, end_tree
from test_fault_tolerance import trials_state, wait_for

pytestmark = pytest.mark.integration

EPOCHS = 10

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Ray 2.60's `ray start --head` turns on token authentication unless told not to; this cluster lives on
# loopback for one test, so every process of it (nodes, `ray status`, the study) runs without.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], log_path) -> subprocess.Popen:
    log = open(log_path, "w")
    # Every node on loopback: nothing of this cluster listens on or talks to another address.
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ENV)


def node_pids(node: subprocess.Popen) -> list[int]:
    return descendants(node.pid) + [node.pid]


@pytest.fixture
def two_nodes(tmp_path):
    port, dashboard = free_port(), free_port()
    temp_dir = f"/tmp/rc2n-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    head = start_node(["--head", f"--port={port}", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                       f"--ray-client-server-port={free_port()}", "--num-cpus=3", f"--temp-dir={temp_dir}",
                       "--node-name=head"], tmp_path / "head.log")
    nodes = [head]
    try:
        address = f"127.0.0.1:{port}"
        wait_for(lambda: subprocess.run([RAY, "status", f"--address={address}"], capture_output=True,
                                        env=ENV).returncode == 0, 300, "the head node")
        second = start_node([f"--address={address}", "--num-cpus=1", "--node-name=second"], tmp_path / "second.log")
        nodes.append(second)
        wait_for(lambda: "2 node" in _status(address) or _status(address).count("node_") >= 2, 300, "the second node")
        yield {"address": address, "dashboard": dashboard, "second": second}
    finally:
        for node in nodes:
            end_tree(node_pids(node) if node.poll() is None else descendants(node.pid))


def _status(address: str) -> str:
    return subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, env=ENV).stdout


def test_study_across_two_nodes_survives_losing_one(tmp_path, two_nodes, synthetic_parquet_dir):
    output = tmp_path / "study"
    # Killed after epoch 2; the epochs after it are the margin (one is ~0.5 s here): at 4 the trial once finished
    # before the node's loss reached it.
    sets = TINY_MODEL + [f"train.epochs={EPOCHS}", "train.num_workers=2", "train.cpus_per_worker=1",
                         "train.placement_strategy=SPREAD", "train.global_batch_size=50", "data.val_size=100",
                         "data.pipeline=torch", "train.amp=fp32", "tune.scheduler=fifo", "optim.lr=0.05",
                         "tune.search_space={}"]
    env = {**ENV, "RAY_ADDRESS": two_nodes["address"],
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{two_nodes['dashboard']}"}
    # `python -m ray_cifar.train`'s DDP path (a study of one TorchTrainer trial, as `tune` runs it): its one test in
    # every run (test_fault_tolerance's killed rank, whose undisturbed run it is, runs only when asked).
    proc = subprocess.Popen([sys.executable, "-m", "ray_cifar.train", "--data", f"file://{synthetic_parquet_dir}",
                             "--output", f"file://{output}", *[a for s in sets for a in ("--set", s)]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        def at_epoch_2():
            trials = list(trials_state(output).values())
            return len(trials) == 1 and trials[0].get("epochs", 0) >= 2

        wait_for(at_epoch_2, 900, "the trial's epoch 2", proc)
        end_tree(node_pids(two_nodes["second"]))  # the node is lost: every process of it at once
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            end_tree(descendants(proc.pid) + [proc.pid])
    assert proc.returncode == 0, out[-4000:]
    # The address printed is the running cluster's dashboard, the head's (tune.dashboard is a local Ray's); no token
    # to sign in with: these nodes run with RAY_AUTH_MODE=disabled.
    assert f"; Ray dashboard: http://127.0.0.1:{two_nodes['dashboard']}\n" in out, out[:3000]

    # `train` imports Ray after its console log began: Ray's records are in the log once each (they were twice)
    (log,) = (output / console.LOGS).iterdir()
    assert log.read_text().count("Connected to Ray cluster") == 1

    trials = list(trials_state(output).values())
    assert [t["status"] for t in trials] == ["completed"]
    rows = sorted(ResultsLog(str(output)).read(), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))  # none lost, none twice
    # The torch pipeline fed both ranks (test_study_pipelines' DDP study is fed by DALI)
    assert {(r["num_workers"], r["data_pipeline"]) for r in rows} == {(2, "torch")}
    before = [r for r in rows if not r["resumed_from_epoch"]]
    assert len(before) >= 2 and all(len(set(r["nodes"].split(","))) == 2 for r in before)  # a rank on each node
    after = [r for r in rows if r["resumed_from_epoch"]]
    assert after and after[0]["resumed_from_epoch"] >= 2  # resumed from its checkpoint, not from scratch
    assert len(set(after[-1]["nodes"].split(","))) == 1  # on the node that is left
