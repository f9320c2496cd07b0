"""Shared fixtures: small synthetic CIFAR-shaped data that a tiny ResNet can learn in seconds."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from ray_cifar.data.source import Cifar10

TINY_MODEL = ["model.name=resnet", "model.blocks=[1,1]", "model.widths=[8,16]", "model.stem_width=8"]


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


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Never touch ~/.cache from tests.
    monkeypatch.setenv("RAY_CIFAR_CACHE", str(tmp_path_factory.getbasetemp() / "ray_cifar_cache"))


@pytest.fixture(scope="session")
def synthetic_parquet_dir(tmp_path_factory) -> str:
    return write_parquet_folder(str(tmp_path_factory.mktemp("cifar_parquet")), synthetic_cifar(600, 100))
