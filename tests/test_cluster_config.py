"""Every cluster-launcher YAML in cluster/ passes Ray's own cluster-config validation (what `ray up` runs
first), and the KubeRay RayJob has what a RayJob needs and an entrypoint ray_cifar's own parser accepts.

Parametrized over the folder, so a new YAML is checked for free. Offline: no cloud calls.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if p != RAYJOB)  # the launcher's (`ray up`) configs


def validate(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def test_the_cluster_folder_has_the_documented_configs():
    assert {p.name for p in YAMLS} >= {"aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_ray_validation(path):
    config = yaml.safe_load(path.read_text())
    validate(config)
    # Every node installs ray_cifar with the pinned requirements from the copied repository.
    assert config["file_mounts"] == {"~/ray_cifar": "."}
    assert any("pip install" in c and "-r requirements.txt -e ." in c for c in config["setup_commands"])


@pytest.mark.parametrize("path", [p for p in YAMLS if "available_node_types" in p.read_text()], ids=lambda p: p.name)
def test_cloud_configs_have_a_cpu_head_and_gpu_workers(path):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpus = sorted(t["resources"].get("GPU", 0) for name, t in types.items() if name != config["head_node_type"])
    assert gpus == [1, 8]
    assert all(t.get("min_workers", 0) == 0 for t in types.values())  # workers exist only while trials need them


@pytest.mark.parametrize("breakage", [
    lambda c: c.pop("provider"),
    lambda c: c.update(auth={"ssh_user": "u", "no_such_key": 1}),
    lambda c: c.update(head_start_ray_commands="ray start --head"),  # a string, not a list
], ids=["no-provider", "unknown-auth-key", "commands-not-a-list"])
def test_validation_catches_a_broken_config(breakage):
    config = yaml.safe_load((CLUSTER / "local.yaml").read_text())
    validate(config)
    breakage(config)
    with pytest.raises(Exception):
        validate(config)


def load_study_entry():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cluster_study", CLUSTER / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_entry_finds_studies_in_the_installed_repo(tmp_path, monkeypatch):
    """`ray submit` runs cluster/study.py from the head's home, where studies/ is not."""
    resolve = load_study_entry().resolve_config
    repo = CLUSTER.parent
    monkeypatch.chdir(tmp_path)
    study = "studies/resnet_under_5m.yaml"
    assert resolve(["--config", study, "--smoke-test"], str(repo)) == [f"--config={repo / study}", "--smoke-test"]
    assert resolve([f"--config={study}"], str(repo)) == [f"--config={repo / study}"]
    (tmp_path / "studies").mkdir()
    (tmp_path / study).write_text("{}")  # a file in the cwd wins
    assert resolve(["--config", study], str(repo)) == ["--config", study]
    assert resolve(["--config", "studies/missing.yaml"], str(repo)) == ["--config", "studies/missing.yaml"]


# -- KubeRay ------------------------------------------------------------------------------------------


def container(group: dict) -> dict:
    (only,) = group["template"]["spec"]["containers"]
    return only


def test_rayjob_has_what_kuberay_needs():
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1  # a retry runs the entrypoint again, on a new cluster
    cluster = spec["rayClusterSpec"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    # The head runs the driver and Tune, never a trial: no GPU, no CPUs for Ray's tasks.
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in container(head)["resources"]["limits"]
    assert workers and all(int(container(w)["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for w in workers)
    for group in [head, *workers]:
        resources = container(group)["resources"]
        assert resources["requests"] == resources["limits"]  # Ray reads the limits; the scheduler the requests
    assert all(w["minReplicas"] <= w["replicas"] <= w["maxReplicas"] for w in workers)
    # Its autoscaler's limits are not readable by the driver: a GPU worker is up when the study starts (it is
    # checked against it), and the trials at once are as many as the workers can be.
    assert all(w["minReplicas"] >= 1 for w in workers)
    assert f"tune.max_concurrent_trials={sum(w['maxReplicas'] for w in workers)}" in spec["entrypoint"]
    images = {container(g)["image"] for g in [head, *workers]}
    assert len(images) == 1  # one ray_cifar on every node
    # The cluster's Ray is the one requirements.txt pins, and the image's (cluster/Dockerfile).
    pinned = next(line for line in (CLUSTER.parent / "requirements.txt").read_text().splitlines()
                  if line.startswith("ray["))
    assert pinned.endswith("==" + ".".join(cluster["rayVersion"].split(".")[:2]) + ".*")
    assert f"rayproject/ray:{cluster['rayVersion']}-py311-gpu" in (CLUSTER / "Dockerfile").read_text()


def test_rayjob_entrypoint_is_a_study_ray_cifar_accepts():
    import shlex

    from ray_cifar import cli, tune

    job = yaml.safe_load(RAYJOB.read_text())
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "ray_cifar.tune"]
    args = cli.parse_args("python -m ray_cifar.tune", tune.__doc__, words[3:], resume="study")
    assert args.data.startswith(("s3://", "gs://")) and args.output.startswith(("s3://", "gs://"))
    assert args.resume_if_exists and not args.resume  # a retried job continues the study in --output
    # The config is read from the image's copy of the repository (cluster/Dockerfile's WORKDIR).
    workdir = next(line.split()[1] for line in (CLUSTER / "Dockerfile").read_text().splitlines()
                   if line.startswith("WORKDIR"))
    assert args.config.startswith(workdir + "/")
    config = CLUSTER.parent / args.config[len(workdir) + 1:]
    assert config.is_file()
    from ray_cifar.validation import load_config

    load_config(str(config), args.sets)  # the study loads and validates as it will on the head


@pytest.mark.parametrize("path", [p for p in YAMLS if "available_node_types" in p.read_text()], ids=lambda p: p.name)
def test_a_study_on_a_launcher_head_is_checked_against_what_its_autoscaler_can_add(path):
    """On `ray up`'s head (CPU 0, no worker yet) every study was refused before its first trial ("a trial needs 2.25
    CPUs, more than the 0 there are"), train.use_gpu null became false and one trial ran at a time: the check read
    the cluster as it was at the start. The head keeps its launcher config (BOOTSTRAP_CONFIG), whose worker types
    say what the autoscaler can bring up."""
    from ray_cifar.tuning.cluster import bootstrap_max, trials_that_fit
    from ray_cifar.validation import check_resources, load_config

    most = bootstrap_max(str(path))  # the head's 0 CPUs, 8 one-GPU workers of 4 CPUs, one 8-GPU worker of 96
    assert most == {"CPU": 8 * 4 + 96, "GPU": 8 + 8, "nodes": 1 + 8 + 1}
    for study in sorted((CLUSTER.parent / "studies").glob("*.yaml")):
        cfg = load_config(str(study))
        cfg.train.use_gpu = True  # what `null` resolves to against these GPUs
        check_resources(cfg, most["CPU"], most["GPU"])
    assert trials_that_fit(most["CPU"], most["GPU"], 1.0, 1.0) == 16
    assert bootstrap_max(str(CLUSTER / "local.yaml")) is None  # its hosts are all up at `ray up`: counted as they are


def test_a_worker_type_without_its_own_max_workers_counts_the_clusters(tmp_path):
    """Ray's launcher gives a worker type without max_workers the cluster's (fill_node_type_min_max_workers): such a
    hand-written config was counted as no workers at all, the study checked against the 0-CPU head."""
    from ray_cifar.tuning.cluster import bootstrap_max

    path = tmp_path / "bootstrap.yaml"
    types = ("available_node_types: {head: {resources: {CPU: 0}}, gpu: {resources: {CPU: 4, GPU: 1}}, "
             "big: {max_workers: 1, resources: {CPU: 8, GPU: 2}}}\nhead_node_type: head\n")
    path.write_text(types + "max_workers: 3\n")
    assert bootstrap_max(str(path)) == {"CPU": 3 * 4 + 8, "GPU": 3 + 2, "nodes": 1 + 3 + 1}
    path.write_text(types)  # no cluster max_workers: what the provider's default is, is not known here
    assert bootstrap_max(str(path)) == {"CPU": 0.0, "GPU": 0.0, "nodes": 1.0}
