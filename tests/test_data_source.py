"""Tests for ray_cifar.data.source on small synthetic copies of each format (no network).

The last test reads the real CIFAR-10 when RAY_CIFAR_DATA points at it, else skips.
"""

from __future__ import annotations

import io
import os
import pickle
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_cifar.data import source as ds
from ray_cifar.data.source import (CLASSES, Cifar10, DataError, load_cifar10, resolve_data_dir,
                                   stratified_split, subset_indices)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Whatever a test forgets to pass, never touch ~/.cache.
    monkeypatch.setenv("RAY_CIFAR_CACHE", str(tmp_path / "env-cache"))


def random_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % 10  # every class present
    rng.shuffle(labels)
    return images, labels


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(file, images, labels, blobs=None) -> None:
    """A Parquet file with the Hugging Face CIFAR-10 schema: img struct<bytes, path>, label int64."""
    blobs = [encode(x) for x in images] if blobs is None else blobs
    img = pa.StructArray.from_arrays(
        [pa.array(blobs, pa.binary()), pa.array([f"{i}.png" for i in range(len(blobs))], pa.string())],
        names=["bytes", "path"])
    pq.write_table(pa.table({"img": img, "label": pa.array(labels, pa.int64())}), file)


@pytest.fixture
def parquet_dir(tmp_path):
    """200 train / 50 test PNG images; returns (folder, train (x, y), test (x, y))."""
    d = tmp_path / "hf"
    d.mkdir()
    train, test = random_images(200, seed=0), random_images(50, seed=1)
    write_parquet(d / "train.parquet", *train)
    write_parquet(d / "test.parquet", *test)
    return d, train, test


def to_chw_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def write_batches(folder, train, test) -> None:
    """torchvision's cifar-10-batches-py: 5 train pickles + test_batch, bytes keys like the originals."""
    folder.mkdir(parents=True)
    (x, y), (xt, yt) = train, test
    for i, (xs, ys) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5)), start=1):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": to_chw_rows(xs), b"labels": ys.tolist()}, fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": to_chw_rows(xt), b"labels": yt.tolist()}, fh)


class Logs(list):
    """A `log` callable that remembers its lines."""
    def __call__(self, msg: str) -> None:
        self.append(msg)

    def has(self, text: str) -> bool:
        return any(text in line for line in self)


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg


# -----------------------------------------------------------------------------
# Formats

def test_parquet_decodes_png_exactly(parquet_dir, tmp_path):
    d, (x, y), (xt, yt) = parquet_dir
    data = load_cifar10(str(d), cache_dir=str(tmp_path / "cache"), log=Logs())
    assert isinstance(data, Cifar10)
    assert data.train_images.dtype == np.uint8 and data.train_images.shape == (200, 32, 32, 3)
    assert data.train_labels.dtype == np.int64 and data.test_labels.dtype == np.int64
    np.testing.assert_array_equal(data.train_images, x)
    np.testing.assert_array_equal(data.train_labels, y)
    np.testing.assert_array_equal(data.test_images, xt)
    np.testing.assert_array_equal(data.test_labels, yt)
    assert data.source == f"parquet:{d}"
    assert len(data.checksum) == 64 and int(data.checksum, 16) >= 0


def test_pickle_batches_chw_to_hwc(tmp_path):
    train, test = random_images(23, seed=2), random_images(7, seed=3)
    x = train[0][0]  # first image, HWC
    x[0, 0] = (11, 22, 33)   # pixel (row 0, col 0)
    x[0, 1] = (44, 55, 66)   # next pixel along the row
    x[1, 0] = (77, 88, 99)   # next row
    write_batches(tmp_path / "tv" / "cifar-10-batches-py", train, test)

    # Planar layout of the pickles: R plane, then G, then B, each row-major.
    with open(tmp_path / "tv" / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        row = pickle.load(fh)[b"data"][0]
    assert (row[0], row[1], row[32], row[1024], row[2048]) == (11, 44, 77, 22, 33)

    # Both the parent folder and the batches folder itself are accepted.
    for folder in (tmp_path / "tv", tmp_path / "tv" / "cifar-10-batches-py"):
        data = load_cifar10(str(folder), cache_dir=str(tmp_path / "cache"), log=Logs())
        assert data.source == f"pickle:{tmp_path / 'tv' / 'cifar-10-batches-py'}"
        assert tuple(data.train_images[0, 0, 0]) == (11, 22, 33)
        assert tuple(data.train_images[0, 0, 1]) == (44, 55, 66)
        assert tuple(data.train_images[0, 1, 0]) == (77, 88, 99)
        np.testing.assert_array_equal(data.train_images, train[0])
        np.testing.assert_array_equal(data.train_labels, train[1])
        np.testing.assert_array_equal(data.test_images, test[0])
        np.testing.assert_array_equal(data.test_labels, test[1])
        assert data.train_images.flags.c_contiguous


def test_env_var_and_torchvision_download(parquet_dir, tmp_path, monkeypatch):
    d, (x, _), _ = parquet_dir
    monkeypatch.setenv("RAY_CIFAR_DATA", str(d))
    assert resolve_data_dir(None) == str(d)
    assert resolve_data_dir("/elsewhere") == "/elsewhere"
    np.testing.assert_array_equal(load_cifar10(None, cache_dir=str(tmp_path / "c"), log=Logs()).train_images, x)

    # No folder anywhere: torchvision "downloads" (faked here) into <cache>/torchvision.
    monkeypatch.delenv("RAY_CIFAR_DATA")
    assert resolve_data_dir(None) is None
    train, test = random_images(10, seed=4), random_images(5, seed=5)
    calls = []

    def fake_download(root):
        calls.append(root)
        write_batches(tmp_path / "c" / "torchvision" / "cifar-10-batches-py", train, test)

    monkeypatch.setattr(ds, "_torchvision_download", fake_download)
    for _ in range(2):  # the second call finds the extracted copy and doesn't download again
        data = load_cifar10(None, cache_dir=str(tmp_path / "c"), log=Logs())
        assert data.source.startswith("torchvision:")
        np.testing.assert_array_equal(data.train_images, train[0])
    assert calls == [str(tmp_path / "c" / "torchvision")]


# -----------------------------------------------------------------------------
# Cache

def test_second_load_hits_cache(parquet_dir, tmp_path, monkeypatch):
    d, (x, y), _ = parquet_dir
    cache = tmp_path / "cache"
    logs = Logs()
    first = load_cifar10(str(d), cache_dir=str(cache), log=logs)
    assert logs.has("decoding") and not logs.has("using cache")
    files = [f for f in os.listdir(cache) if not f.endswith((".lock", ".sha256", ".verified"))
             and not f.startswith("cifar10-checksum-")]
    assert len(files) == 1 and files[0].endswith(".npz")  # and no temp file left behind
    assert sorted(os.listdir(cache)) == sorted([files[0], files[0] + ".lock", files[0] + ".sha256",
                                                files[0] + ".verified", *[f for f in os.listdir(cache)
                                                                          if f.startswith("cifar10-checksum-")]])
    assert first.checksum[:16] in files[0]

    def no_decoding(*_):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(ds, "_read_parquet", no_decoding)
    logs = Logs()
    t0 = time.perf_counter()
    second = load_cifar10(str(d), cache_dir=str(cache), log=logs)
    assert time.perf_counter() - t0 < 2
    assert sum("using cache" in line for line in logs) == 1
    np.testing.assert_array_equal(second.train_images, x)
    np.testing.assert_array_equal(second.train_labels, y)
    assert second.checksum == first.checksum and second.source == first.source


def test_changed_source_misses_cache(parquet_dir, tmp_path):
    d, (x, y), _ = parquet_dir
    cache = str(tmp_path / "cache")
    a = load_cifar10(str(d), cache_dir=cache, log=Logs())
    write_parquet(d / "train.parquet", x[::-1].copy(), y[::-1].copy())
    logs = Logs()
    b = load_cifar10(str(d), cache_dir=cache, log=logs)
    assert b.checksum != a.checksum and logs.has("decoding")
    np.testing.assert_array_equal(b.train_images, x[::-1])


def test_corrupt_cache_is_rebuilt(parquet_dir, tmp_path):
    d, (x, _), _ = parquet_dir
    cache = tmp_path / "cache"
    load_cifar10(str(d), cache_dir=str(cache), log=Logs())
    (npz,) = cache.glob("*.npz")
    npz.write_bytes(b"truncated")
    logs = Logs()
    np.testing.assert_array_equal(load_cifar10(str(d), cache_dir=str(cache), log=logs).train_images, x)
    assert logs.has("decoding")


def test_damage_inside_the_cached_image_bytes_is_found_and_rebuilt(parquet_dir, tmp_path, monkeypatch):
    """Bytes changed inside the train images (headers, shapes and labels intact: only the checksum can tell)."""
    d, (x, _), _ = parquet_dir
    cache = tmp_path / "cache"
    load_cifar10(str(d), cache_dir=str(cache), log=Logs())
    (npz,) = cache.glob("*.npz")
    offset = ds._mmap_npz(str(npz))["train_images"].offset + 5 * 32 * 32 * 3  # image 5
    with open(npz, "r+b") as f:
        f.seek(offset)
        inverted = bytes(255 - b for b in f.read(64))
        f.seek(offset)
        f.write(inverted)
    assert not (ds._mmap_npz(str(npz))["train_images"][5] == x[5]).all()
    logs = Logs()
    np.testing.assert_array_equal(load_cifar10(str(d), cache_dir=str(cache), log=logs).train_images, x)
    damaged = [line for line in logs if "damaged" in line]
    assert len(damaged) == 1 and "do not match" in damaged[0] and str(npz) in damaged[0], list(logs)
    assert logs.has("decoding")

    # Verified once after each change: an unchanged cache is not hashed again; a touched one is, and passes.
    def no_hashing(path):
        raise AssertionError("an unchanged cache hashed again")

    with monkeypatch.context() as m:
        m.setattr(ds.storage, "file_sha256", no_hashing)
        logs = Logs()
        load_cifar10(str(d), cache_dir=str(cache), log=logs)
        assert logs.has("using cache") and not logs.has("damaged"), list(logs)
    os.utime(npz)
    logs = Logs()
    load_cifar10(str(d), cache_dir=str(cache), log=logs)
    assert logs.has("using cache") and not logs.has("damaged"), list(logs)


def test_a_cache_without_its_checksum_is_decoded_again(parquet_dir, tmp_path):
    d, (x, _), _ = parquet_dir
    cache = tmp_path / "cache"
    load_cifar10(str(d), cache_dir=str(cache), log=Logs())
    (npz,) = cache.glob("*.npz")
    os.remove(str(npz) + ".sha256")  # as an older ray_cifar left it
    logs = Logs()
    np.testing.assert_array_equal(load_cifar10(str(d), cache_dir=str(cache), log=logs).train_images, x)
    assert logs.has("has no checksum") and logs.has("decoding") and os.path.exists(str(npz) + ".sha256")


# -----------------------------------------------------------------------------
# Errors: one line, naming what was looked for

def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path / "nope"), cache_dir=str(tmp_path / "c"))
    assert_one_line(e, str(tmp_path / "nope"), "does not exist", "--data", "RAY_CIFAR_DATA")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(e, f"no CIFAR-10 found at {tmp_path}", "train.parquet+test.parquet",
                    "cifar-10-batches-py", "--data", "RAY_CIFAR_DATA")


def test_only_one_parquet(parquet_dir, tmp_path):
    d, _, _ = parquet_dir
    (d / "test.parquet").unlink()
    with pytest.raises(DataError) as e:
        load_cifar10(str(d), cache_dir=str(tmp_path / "c"))
    assert_one_line(e, "test.parquet")


def test_garbage_parquet(parquet_dir, tmp_path):
    d, _, _ = parquet_dir
    (d / "train.parquet").write_bytes(b"this is not a parquet file" * 100)
    with pytest.raises(DataError) as e:
        load_cifar10(str(d), cache_dir=str(tmp_path / "c"))
    assert_one_line(e, str(d / "train.parquet"))


@pytest.mark.parametrize("bad_label", [10, -1])
def test_labels_out_of_range(tmp_path, bad_label):
    (x, y), (xt, yt) = random_images(20, 0), random_images(10, 1)
    y[3] = bad_label
    write_parquet(tmp_path / "train.parquet", x, y)
    write_parquet(tmp_path / "test.parquet", xt, yt)
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(e, str(tmp_path / "train.parquet"), "0..9")


def test_labels_out_of_range_pickle(tmp_path):
    (x, y), test = random_images(20, 0), random_images(10, 1)
    y[0] = 10
    write_batches(tmp_path / "cifar-10-batches-py", (x, y), test)
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(e, "data_batch_1", "0..9")


def test_missing_column(tmp_path):
    x, y = random_images(5, 0)
    pq.write_table(pa.table({"image": pa.array([encode(i) for i in x]), "label": y}), tmp_path / "train.parquet")
    write_parquet(tmp_path / "test.parquet", x, y)
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(e, str(tmp_path / "train.parquet"), "img")


def test_undecodable_and_wrong_size_images(tmp_path):
    x, y = random_images(5, 0)
    write_parquet(tmp_path / "test.parquet", x, y)
    cases = {
        "cannot decode": [encode(i) for i in x[:4]] + [b"\x89PNG garbage"],
        "expected 32x32": [encode(i) for i in x[:4]] + [encode(np.zeros((16, 16, 3), np.uint8))],
    }
    for expected, blobs in cases.items():
        write_parquet(tmp_path / "train.parquet", x, y, blobs=blobs)
        with pytest.raises(DataError) as e:
            load_cifar10(str(tmp_path), cache_dir=str(tmp_path / "c"))
        assert_one_line(e, str(tmp_path / "train.parquet"), "row 4", expected)


def test_incomplete_pickle_folder(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py", random_images(10, 0), random_images(5, 1))
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(e, "test_batch")


def test_download_failure_is_data_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_CIFAR_DATA", raising=False)

    def offline(root):
        raise OSError("[Errno -3] Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(ds, "_torchvision_download", offline)
    with pytest.raises(DataError) as e:
        load_cifar10(None, cache_dir=str(tmp_path / "c"))
    assert_one_line(e, "download", "name resolution", "--data", "RAY_CIFAR_DATA")
    with pytest.raises(DataError) as e:
        load_cifar10(None, cache_dir=str(tmp_path / "c"), download=False)
    assert_one_line(e, "--data")


# -----------------------------------------------------------------------------
# Splits

def imbalanced_labels() -> np.ndarray:
    # 10 classes with 100, 110, ..., 190 samples, shuffled.
    labels = np.repeat(np.arange(10), 100 + 10 * np.arange(10))
    return np.random.default_rng(0).permutation(labels)


def test_stratified_split_proportions_and_cover():
    labels = imbalanced_labels()
    n = len(labels)
    for val_size in (1, 7, 145, 500, n - 1):
        train, val = stratified_split(labels, val_size, seed=0)
        assert train.dtype == np.int64 and val.dtype == np.int64
        assert len(val) == val_size and len(train) + len(val) == n
        assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no duplicates
        assert np.intersect1d(train, val).size == 0
        np.testing.assert_array_equal(np.union1d(train, val), np.arange(n))
        # Largest remainder: each class gets floor or ceil of its exact share.
        exact = np.bincount(labels) * val_size / n
        got = np.bincount(labels[val], minlength=10)
        assert np.all((got == np.floor(exact)) | (got == np.ceil(exact))), (got, exact)


def test_stratified_split_exact_on_cifar_like_labels():
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 500))
    _, val = stratified_split(labels, 500, seed=3)
    np.testing.assert_array_equal(np.bincount(labels[val]), [50] * 10)
    _, val = stratified_split(labels, 505, seed=3)  # remainder 5 goes to 5 classes
    assert sorted(np.bincount(labels[val])) == [50] * 5 + [51] * 5


def test_stratified_split_seeding_and_edges():
    labels = imbalanced_labels()
    a, b, c = (stratified_split(labels, 200, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    train, val = stratified_split(labels, 0, seed=0)
    assert len(val) == 0 and val.dtype == np.int64
    np.testing.assert_array_equal(train, np.arange(len(labels)))
    for bad in (len(labels), len(labels) + 1, -1):
        with pytest.raises(ValueError):
            stratified_split(labels, bad, seed=0)


def test_subset_indices():
    labels = imbalanced_labels()
    train, _ = stratified_split(labels, 300, seed=0)
    np.testing.assert_array_equal(subset_indices(labels, train, None, seed=0), train)
    np.testing.assert_array_equal(subset_indices(labels, train, len(train) + 5, seed=0), train)
    sub = subset_indices(labels, train, 123, seed=0)
    assert len(sub) == 123 and sub.dtype == np.int64
    assert np.all(np.diff(sub) > 0) and np.isin(sub, train).all()
    exact = np.bincount(labels[train]) * 123 / len(train)
    got = np.bincount(labels[sub], minlength=10)
    assert np.all((got == np.floor(exact)) | (got == np.ceil(exact)))
    np.testing.assert_array_equal(sub, subset_indices(labels, train, 123, seed=0))
    assert not np.array_equal(sub, subset_indices(labels, train, 123, seed=1))


# -----------------------------------------------------------------------------
# Real data

def test_real_cifar10(tmp_path):
    if not os.environ.get("RAY_CIFAR_DATA"):
        pytest.skip("RAY_CIFAR_DATA not set: real CIFAR-10 not available")
    data = load_cifar10(None, cache_dir=str(tmp_path / "cache"), download=False, log=Logs())
    assert data.train_images.shape == (50000, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(data.train_labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(data.test_labels), [1000] * 10)
    mean = data.train_images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, [0.4913, 0.4821, 0.4465], atol=0.003)
    assert len(CLASSES) == 10


def test_cached_train_images_are_memory_mapped(parquet_dir, tmp_path):
    # Every rank of every trial maps the one cache file instead of reading 150 MB into its own memory.
    d, (x, y), (xt, _) = parquet_dir
    cache = str(tmp_path / "cache")
    load_cifar10(str(d), cache_dir=cache, log=Logs())
    second = load_cifar10(str(d), cache_dir=cache, log=Logs())
    assert isinstance(second.train_images, np.memmap) and not second.train_images.flags.writeable
    np.testing.assert_array_equal(second.train_images[[3, 1, 4]], x[[3, 1, 4]])
    assert second.test_images.flags.writeable  # used whole: an ordinary array
    np.testing.assert_array_equal(second.test_images, xt)


def test_checksum_is_remembered_until_a_file_changes(parquet_dir, tmp_path, monkeypatch):
    d, _, _ = parquet_dir
    cache = str(tmp_path / "cache")
    first = load_cifar10(str(d), cache_dir=cache, log=Logs())
    hashed = []
    real = ds.file_checksum
    monkeypatch.setattr(ds, "file_checksum", lambda files: hashed.append(files) or real(files))
    assert load_cifar10(str(d), cache_dir=cache, log=Logs()).checksum == first.checksum
    assert hashed == []  # the memo, not a re-read of the files
    write_parquet(d / "train.parquet", *random_images(200, seed=5))  # new bytes, new mtime
    changed = load_cifar10(str(d), cache_dir=cache, log=Logs())
    assert len(hashed) == 1 and changed.checksum != first.checksum
