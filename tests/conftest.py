"""Shared fixtures: small synthetic CIFAR-shaped data that a tiny ResNet can learn in seconds."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from ray_cifar.data.source import Cifar10

TINY_MODEL = ["model.name=resnet", "model.blocks=[1,1]", "model.widths=[8,16]", "model.stem_width=8"]
# An epoch's figures that a run resumed from its checkpoint must repeat exactly (test_checkpoint, test_ddp).
EXACT_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "steps")


def synthetic_cifar(n_train: int = 400, n_test: int = 100, seed: int = 0) -> Cifar10:
    """Images whose mean colour encodes the class (plus noise), so accuracy climbs within an epoch."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(10, 3))

    def make(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        noise = rng.integers(-30, 31, size=(n, 32, 32, 3))
        images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return Cifar10(train_x, train_y, test_x, test_y, source="synthetic", checksum="synthetic")


def write_parquet_folder(folder: str, data: Cifar10) -> str:
    """Write `data` in the Hugging Face CIFAR-10 Parquet schema (PNG bytes), as ../shared/data/cifar10 is."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name, images, labels in (("train", data.train_images, data.train_labels),
                                 ("test", data.test_images, data.test_labels)):
        encoded = []
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            encoded.append({"bytes": buf.getvalue(), "path": f"{name}/{i}.png"})
        pq.write_table(pa.table({"img": encoded, "label": labels}), os.path.join(folder, f"{name}.parquet"))
    return folder


def resolved_config(sections: dict) -> dict:
    """A config.yaml's contents as a study writes them: every section, `sections` over the defaults (a hand-made
    one of a section or two reads as cut short: config.cut_short)."""
    from ray_cifar.config import Config, apply_overrides

    cfg = Config()
    apply_overrides(cfg, sections)
    return cfg.to_dict()


def long_test(what: str) -> None:
    """Skip unless RAY_CIFAR_LONG_TESTS=1. make test must end within 15 minutes on CI's 2 cores; what runs only when
    asked repeats, for another searcher, tracker, bucket or signal, a kill-and-resume or stop path that a test in
    every run covers, its own part (a handler, a file set aside) tested in every run without a study."""
    if os.environ.get("RAY_CIFAR_LONG_TESTS") != "1":
        pytest.skip(f"{what}: set RAY_CIFAR_LONG_TESTS=1")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Never touch ~/.cache from tests.
    monkeypatch.setenv("RAY_CIFAR_CACHE", str(tmp_path_factory.getbasetemp() / "ray_cifar_cache"))


@pytest.fixture(scope="session")
def synthetic_parquet_dir(tmp_path_factory) -> str:
    return write_parquet_folder(str(tmp_path_factory.mktemp("cifar_parquet")), synthetic_cifar(600, 100))


# Whole files go to the two workers (make test: --dist loadfile), taken from the front of the collection as each
# worker frees up. The longest first (measured, sum of a file's tests: 210-30 s each), so the many short files fill
# the end and no worker is left running a long file after the other has finished. xdist's own default order (most
# tests first) put these, with one to four tests each, last: one worker ran on ~90 s alone. Files not named keep
# their order after these.
LONGEST_FIRST = ("test_fault_tolerance", "test_remote_output", "test_gpu_check", "test_beyond_grids", "test_study",
                 "test_stops", "test_asha_fidelity", "test_study_pipelines", "test_two_nodes", "test_cluster_launcher",
                 "test_studies", "test_study_results", "test_tracking")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's tests keep their order
