"""A study on an autoscaling Ray cluster whose head has no CPU, as cluster/aws-gpu.yaml makes one: Ray's fake
node provider on loopback (`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`), whose autoscaler starts
a worker node on this machine when a trial's resources wait.

Checked against the cluster as it was at the start (0 CPUs), every such study was refused before its first trial.
The driver finds the autoscaler's node types where `ray up` leaves them on the head (~/ray_bootstrap_config.yaml:
its HOME is a folder of this test), so the study runs, its trials on the node the autoscaler adds. Run only when
asked (RAY_CIFAR_LONG_TESTS=1: ~3 minutes); the head and every node it started are ended by pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_MODEL, long_test
from processes import descendants, end_tree
from test_fault_tolerance import wait_for
from test_two_nodes import RAY, free_port

pytestmark = pytest.mark.integration


def cluster_config(gcs: str) -> dict:
    """A head of 0 CPUs and one worker type of 3 CPUs, at most one node of it (the fake provider's fields)."""
    return {"cluster_name": "ray-cifar-test", "max_workers": 1,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                "ray.worker.cpu": {"resources": {"CPU": 3}, "node_config": {}, "min_workers": 0, "max_workers": 1}},
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}


def test_a_study_runs_on_an_autoscaling_cluster_whose_head_has_no_cpu(tmp_path, synthetic_parquet_dir):
    long_test("a study on a fake autoscaling cluster")
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text(json.dumps(cluster_config(gcs)))  # JSON is YAML
    # RAY_ADDRESS for every process of the cluster too: this machine's other address made Ray Train's placement-group
    # cleaner find "multiple active Ray instances", and a finished trial's workers' group was never removed.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_ADDRESS": gcs, "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true",
                             f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
                             f"--temp-dir=/tmp/rcas-{os.getpid()}",  # short: Ray's socket paths stay under 108 bytes
                             f"--autoscaling-config={home / 'ray_bootstrap_config.yaml'}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_for(lambda: subprocess.run([RAY, "status", f"--address={gcs}"], capture_output=True,
                                        env=env).returncode == 0, 300, "the head node")
        output = tmp_path / "study"
        study = subprocess.run(
            [sys.executable, "-m", "ray_cifar.tune", "--data", synthetic_parquet_dir, "--output", f"file://{output}",
             *[a for m in TINY_MODEL for a in ("--set", m)], "--set", "train.num_workers=2", "--set",
             "train.epochs=1", "--set", "data.train_subset=200", "--set", "data.val_size=100", "--set",
             "train.global_batch_size=50", "--set", "tune.search_space={optim.lr: {grid: [0.1, 0.01]}}"],
            capture_output=True, text=True, timeout=600, env={**env, "HOME": str(home)})
        out = study.stdout + study.stderr
        assert study.returncode == 0, out[-3000:]
        assert "2 DDP rank(s) per trial (CPU), 1 trial(s) at once" in out  # 3 CPUs at most: one 2.25-CPU trial
        trials = json.loads((output / "trials.json").read_text())
        assert sorted(t["status"] for t in trials.values()) == ["completed", "completed"]
        nodes = subprocess.run([RAY, "status", f"--address={gcs}"], capture_output=True, text=True, env=env).stdout
        assert "ray.worker.cpu" in nodes  # the node the autoscaler added, where the trials ran
    finally:
        end_tree(descendants(head.pid) + [head.pid])
