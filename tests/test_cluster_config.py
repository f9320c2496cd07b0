"""Every cluster YAML in cluster/ passes Ray's own cluster-config validation (what `ray up` runs first).

Parametrized over the folder, so a new YAML is checked for free. Offline: no cloud calls.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))


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
