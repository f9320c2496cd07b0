"""CIFAR-10 loading: find a copy on disk, decode it once, cache the arrays.

Three sources are understood, detected in this order inside the data folder:

  1. Hugging Face Parquet export: train.parquet + test.parquet, column `img`
     (struct<bytes, path> holding encoded JPEG/PNG) and column `label` (int64).
  2. torchvision's `cifar-10-batches-py` (the folder itself or its parent):
     pickled dicts with b'data' (N x 3072 uint8, CHW planar) and b'labels'.
  3. No folder given at all: torchvision downloads into <cache_dir>/torchvision.

Whatever the source, the result is plain uint8 NHWC RGB arrays plus int64
labels. Decoding 60k JPEGs takes seconds, so the decoded arrays are cached as an
uncompressed .npz keyed by a sha256 of the source files; every later run (and
every DDP worker) then loads in a fraction of a second. Beside the cache lies its
own sha256 (NAME.npz.sha256): damaged image bytes are found and the cache is decoded
again, with one warning line. Hashing the 185 MB cache costs ~0.2 s of CPU, so it is
done once after each change of the file: NAME.npz.verified remembers the file's stat
(inode, size, mtime, ctime) when its bytes last matched, and a start whose stat is
the same reads no more than it did before.

This module is the data layer only: it must not import ray or DALI, so it can be
used (and tested) on any machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .. import storage

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)
IMAGE_SHAPE = (32, 32, 3)

# Bump when the decoding changes, so stale caches are not reused.
CACHE_VERSION = 1
HINT = "pass --data DIR or set RAY_CIFAR_DATA"
PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PICKLE_TEST = "test_batch"

Log = Callable[[str], None]


class DataError(Exception):
    """One-line, user-facing message (no traceback will be shown); e.g. how to point at a copy."""


@dataclass(frozen=True, eq=False)  # eq=False: arrays don't compare/hash as scalars
class Cifar10:
    train_images: np.ndarray = field(repr=False)  # uint8, N x 32 x 32 x 3 (NHWC, RGB)
    train_labels: np.ndarray = field(repr=False)  # int64, N, values 0..9
    test_images: np.ndarray = field(repr=False)   # uint8, M x 32 x 32 x 3
    test_labels: np.ndarray = field(repr=False)   # int64, M
    source: str    # where it came from, e.g. "parquet:/abs/path"
    checksum: str  # sha256 hex of the source files; the cache key


# -----------------------------------------------------------------------------
# Locating a copy

def resolve_data_dir(path: str | None) -> str | None:
    """path if given, else env RAY_CIFAR_DATA, else None."""
    path = path or os.environ.get("RAY_CIFAR_DATA") or None
    return os.path.expanduser(path) if path else None


def default_cache_dir() -> str:
    return os.path.expanduser(os.environ.get("RAY_CIFAR_CACHE") or "~/.cache/ray_cifar")


def _find_pickle_dir(path: str) -> str | None:
    """The folder holding data_batch_1, accepting it or its cifar-10-batches-py child."""
    for d in (path, os.path.join(path, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(d, "data_batch_1")):
            return d
    return None


def _find_source(path: str) -> tuple[str, str, list[str]]:
    """(kind, folder, files) for the copy in `path`, or DataError saying what was looked for."""
    if not os.path.exists(path):
        raise DataError(f"CIFAR-10 folder {path} does not exist; {HINT}")
    if not os.path.isdir(path):
        raise DataError(f"CIFAR-10 path {path} is not a folder (point at the folder holding "
                        f"train.parquet+test.parquet or cifar-10-batches-py); {HINT}")
    parquet = [os.path.join(path, f"{split}.parquet") for split in ("train", "test")]
    present = [f for f in parquet if os.path.isfile(f)]
    if len(present) == 2:
        return "parquet", path, parquet
    if len(present) == 1:
        missing = next(f for f in parquet if f not in present)
        raise DataError(f"found {present[0]} but not {missing}: both splits are needed; {HINT}")
    pickle_dir = _find_pickle_dir(path)
    if pickle_dir is not None:
        files = [os.path.join(pickle_dir, f) for f in (*PICKLE_TRAIN, PICKLE_TEST)]
        missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
        if missing:
            raise DataError(f"incomplete cifar-10-batches-py at {pickle_dir}: missing {', '.join(missing)}")
        return "pickle", pickle_dir, files
    raise DataError(f"no CIFAR-10 found at {path}: expected train.parquet+test.parquet "
                    f"or cifar-10-batches-py; {HINT}")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def source_checksum(files: list[str], cache_dir: str, log: Log = print) -> str:
    """file_checksum, remembered in cache_dir under the files' (path, size, mtime) so that the
    ranks of every trial skip re-reading ~57 MB; a rewritten file changes its mtime, so is hashed again."""
    stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    memo = os.path.join(cache_dir, f"cifar10-checksum-{hashlib.sha256(repr(stats).encode()).hexdigest()[:16]}.txt")
    known = _read_small(memo)
    if known is not None:
        if _SHA256.match(known):
            return known
        log(f"cifar10: warning: {memo} is damaged; hashing the source again and rewriting it")
    checksum = file_checksum(files)
    with contextlib.suppress(OSError):  # a read-only cache dir: hash again next time
        os.makedirs(cache_dir, exist_ok=True)
        _write_atomically(memo, checksum)
    return checksum


def file_checksum(files: list[str], chunk: int = 1 << 20) -> str:
    """sha256 over the names and full bytes of `files`, read in 1 MiB chunks (~57 MB: well under a second)."""
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.basename(f).encode() + b"\0")
        try:
            with open(f, "rb") as fh:
                while block := fh.read(chunk):
                    h.update(block)
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror or e}") from None
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Decoding: Parquet (HF schema)

def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _read_parquet(file: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one HF-schema Parquet file into (uint8 NHWC images, int64 labels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read Parquet file {file}: {_one_line(e)}") from None
    missing = [c for c in ("img", "label") if c not in table.column_names]
    if missing:
        raise DataError(f"{file}: missing column(s) {', '.join(missing)} "
                        f"(expected Hugging Face CIFAR-10 schema: img, label)")
    img, label = table.column("img"), table.column("label")
    if not pa.types.is_struct(img.type) or img.type.get_field_index("bytes") < 0:
        raise DataError(f"{file}: column img is {img.type}, expected struct<bytes: binary, path: string>")
    if not pa.types.is_integer(label.type) or label.null_count:
        raise DataError(f"{file}: column label must be non-null integers, got {label.type}")

    labels = label.to_numpy().astype(np.int64)
    _check_labels(labels, file)
    blobs = img.combine_chunks().field("bytes").to_pylist()
    images = np.empty((len(blobs), *IMAGE_SHAPE), np.uint8)
    # ~100 us per 32x32 JPEG, so 6-8 s for all 60k, once: the cache makes a process pool moot.
    for i, b in enumerate(blobs):
        if b is None:
            raise DataError(f"{file}: row {i} has no image bytes")
        try:
            x = _decode_image(b)
        except Exception as e:  # PIL raises a zoo of types on bad data
            raise DataError(f"{file}: row {i}: cannot decode image ({_one_line(e)})") from None
        if x.shape != IMAGE_SHAPE:
            raise DataError(f"{file}: row {i}: image is {x.shape[1]}x{x.shape[0]}, expected 32x32")
        images[i] = x
    return images, labels


# -----------------------------------------------------------------------------
# Decoding: torchvision pickles

def _read_pickle(file: str) -> tuple[np.ndarray, np.ndarray]:
    """One cifar-10-batches-py batch: CHW-planar rows -> uint8 NHWC images."""
    try:
        with open(file, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")  # the official batches are Python 2 pickles
        # Keys are bytes in the official files; accept str too (re-pickled under Python 3).
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        data, labels = np.asarray(d["data"], np.uint8), np.asarray(d["labels"], np.int64)
    except Exception as e:
        raise DataError(f"cannot read CIFAR-10 batch {file}: {_one_line(e)}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{file}: data is {data.shape} with {len(labels)} labels, expected N x 3072 and N labels")
    _check_labels(labels, file)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_pickles(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_pickle(f) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _check_labels(labels: np.ndarray, file: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{file}: labels must be in 0..{NUM_CLASSES - 1}, "
                        f"found {labels.min()}..{labels.max()}")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


# -----------------------------------------------------------------------------
# Download (only when no folder was given)

def _torchvision_download(root: str) -> None:
    """Fetch the python-pickle tarball into root/cifar-10-batches-py (train and test share it)."""
    import torchvision
    torchvision.datasets.CIFAR10(root=root, train=True, download=True)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive lock so concurrent DDP workers don't download/extract over each other."""
    try:
        import fcntl
    except ImportError:  # not POSIX: best effort, no lock
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download(cache_dir: str, log: Log) -> str:
    """Folder holding cifar-10-batches-py under cache_dir, downloading it if absent."""
    root = os.path.join(cache_dir, "torchvision")
    try:
        os.makedirs(root, exist_ok=True)
        with _file_lock(os.path.join(root, ".download.lock")):
            if _find_pickle_dir(root) is None:
                log(f"cifar10: no --data/RAY_CIFAR_DATA given; downloading with torchvision into {root}")
                _torchvision_download(root)
    except DataError:
        raise
    except Exception as e:  # no internet, no torchvision, disk full, ...
        raise DataError(f"could not download CIFAR-10 into {root} ({_one_line(e)}); {HINT}") from None
    return root


# -----------------------------------------------------------------------------
# Cache

def _cache_file(cache_dir: str, kind: str, checksum: str) -> str:
    return os.path.join(cache_dir, f"cifar10-{kind}-v{CACHE_VERSION}-{checksum[:16]}.npz")


def _load_cache(file: str, log: Log = print) -> dict[str, np.ndarray] | None:
    """The cached arrays; the train images memory-mapped, read-only (a smoke trial touches a few
    thousand of 50,000, and every rank of every trial shares the page cache instead of a copy).
    None when there is none, or when it is damaged (then decoded again and rewritten, with a warning)."""
    if not os.path.isfile(file):
        return None
    try:
        arrays = _mmap_npz(file)
        arrays = {k: arrays[k] if k == "train_images" else np.array(arrays[k])
                  for k in ("train_images", "train_labels", "test_images", "test_labels")}
        _check_cached(arrays, file)
        _check_cache_bytes(file)
        return arrays
    except _Unchecked as e:
        log(f"cifar10: warning: cache {file} {e}; decoding the source again")
        return None
    except Exception as e:  # noqa: BLE001 - truncated/corrupt cache (zipfile, numpy, ValueError...): decode again
        log(f"cifar10: warning: cache {file} is damaged ({_one_line(e)}); decoding the source again")
        return None


class _Unchecked(Exception):
    """A cache without its checksum: an older ray_cifar wrote it, or the .sha256 beside it was lost."""


def _stat_stamp(file: str) -> str:
    """What changes whenever the file's bytes are written, copied or replaced (ctime: even a restored mtime)."""
    st = os.stat(file)
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def _read_small(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:  # bytes: a damaged file must not raise UnicodeDecodeError
            return fh.read(300).decode("ascii", errors="replace").strip()
    except OSError:
        return None


def _check_cache_bytes(file: str) -> None:
    """Raise ValueError unless the cache's bytes are the ones written (NAME.sha256), _Unchecked without it.

    The hash is skipped when NAME.verified holds this checksum and the file's current stat: the bytes were
    hashed and matched since the file last changed."""
    expected = _read_small(file + ".sha256")
    if expected is None:
        raise _Unchecked(f"has no checksum beside it ({os.path.basename(file)}.sha256: written by an older "
                         f"ray_cifar, or lost)")
    if not _SHA256.match(expected):
        raise ValueError(f"its checksum {file}.sha256 is damaged")
    verified = f"{expected} {_stat_stamp(file)}"
    if _read_small(file + ".verified") == verified:
        return
    if storage.file_sha256(file) != expected:
        raise ValueError(f"its bytes do not match {os.path.basename(file)}.sha256")
    with contextlib.suppress(OSError):  # a read-only or full cache dir: hashed again next time
        _write_atomically(file + ".verified", verified)


def _write_atomically(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _check_cached(arrays: dict[str, np.ndarray], file: str) -> None:
    """The shapes and labels a decode writes: a cache whose headers survived but whose bytes did not is caught
    where it shows (labels out of 0..9) without reading every image."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise ValueError(f"{split} arrays of the wrong shape or type")
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"{split} labels outside 0..{NUM_CLASSES - 1}")


def _mmap_npz(file: str) -> dict[str, np.ndarray]:
    """Memory-map every array of an uncompressed .npz (np.load ignores mmap_mode for .npz).

    Each member is a stored (not deflated) .npy; its data starts after the zip local header
    (30 bytes + name + extra field) and the .npy header."""
    import struct
    import zipfile

    arrays = {}
    with zipfile.ZipFile(file) as z, open(file, "rb") as fh:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"{file}: {info.filename} is not a stored .npy")
            fh.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", fh.read(4))
            fh.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(fh)
            if dtype.hasobject:
                raise ValueError(f"{file}: {info.filename} holds Python objects")
            arrays[info.filename[:-4]] = np.memmap(file, dtype=dtype, mode="r", offset=fh.tell(), shape=shape,
                                                   order="F" if fortran_order else "C")
    return arrays


def _save_cache(file: str, arrays: dict[str, np.ndarray], log: Log) -> None:
    """Atomic write: a temp file in the same folder, then os.replace, so a concurrent reader
    sees either no cache or a complete one, never a half-written file. Its checksum, of the bytes
    read back from disk, is in place first: a cache that is there has the checksum it was written with."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file), prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # uncompressed: loading is then just a read
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
        digest = storage.file_sha256(tmp)
        _write_atomically(file + ".sha256", digest)
        os.replace(tmp, file)
        tmp = None
        with contextlib.suppress(OSError):  # without it, the first load hashes the cache once more
            _write_atomically(file + ".verified", f"{digest} {_stat_stamp(file)}")
    except OSError as e:  # read-only/full disk: still usable, just slower next time
        log(f"cifar10: could not write cache {file} ({_one_line(e)}); continuing without it")
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


# -----------------------------------------------------------------------------
# Entry point

def load_cifar10(path: str | None, cache_dir: str | None = None, download: bool = True,
                 log: Log = print) -> Cifar10:
    """Load CIFAR-10 from `path` (or RAY_CIFAR_DATA, or a torchvision download), via the cache."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    path = resolve_data_dir(path)
    if path is not None and storage.is_uri(path):
        try:
            path = storage.fetch_data(path, cache_dir)  # once per node: later calls reuse the local copy
        except (storage.StorageError, OSError) as e:
            raise DataError(str(e)) from None
    if path is None:
        if not download:
            raise DataError(f"no CIFAR-10 location given and download disabled; {HINT}")
        kind, folder, files = _find_source(_download(cache_dir, log))
        kind = "torchvision"
    else:
        kind, folder, files = _find_source(os.path.abspath(path))
    source = f"{kind}:{folder}"
    checksum = source_checksum(files, cache_dir, log)

    cache = _cache_file(cache_dir, kind, checksum)
    arrays = _load_cache(cache, log)
    if arrays is None:
        # Workers that start together queue here: one decodes, the rest then hit its cache.
        with _cache_lock(cache):
            arrays = _load_cache(cache, lambda msg: None)  # said once above
            if arrays is None:
                return Cifar10(**_decode(kind, files, source, cache, log), source=source, checksum=checksum)
    log(f"cifar10: using cache {cache} for {source}")
    return Cifar10(**arrays, source=source, checksum=checksum)


def _decode(kind: str, files: list[str], source: str, cache: str, log: Log) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    log(f"cifar10: decoding {source} (first run; cached afterwards)")
    if kind == "parquet":
        (xtr, ytr), (xte, yte) = _read_parquet(files[0]), _read_parquet(files[1])
    else:
        (xtr, ytr), (xte, yte) = _read_pickles(files[:-1]), _read_pickle(files[-1])
    arrays = dict(train_images=xtr, train_labels=ytr, test_images=xte, test_labels=yte)
    _save_cache(cache, arrays, log)
    log(f"cifar10: decoded {len(xtr)} train + {len(xte)} test images in "
        f"{time.perf_counter() - t0:.1f}s; cached to {cache}")
    return arrays


@contextlib.contextmanager
def _cache_lock(cache: str) -> Iterator[None]:
    """_file_lock on cache + '.lock'; if the cache dir isn't writable, go on unlocked."""
    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            stack.enter_context(_file_lock(cache + ".lock"))
        except OSError:
            pass
        yield


# -----------------------------------------------------------------------------
# Splits

def _stratified_pick(labels: np.ndarray, idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n of `idx`, with per-class counts proportional to class frequency among labels[idx].

    Largest-remainder rounding makes the per-class counts sum to exactly n; ties in the
    remainder go to the lower class, so the counts themselves don't depend on the seed.
    """
    classes, inverse, counts = np.unique(labels[idx], return_inverse=True, return_counts=True)
    exact = counts * n / len(idx)
    quota = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]
    quota[extra] += 1  # never exceeds counts: n < len(idx) means exact < counts
    picked = [rng.permutation(idx[inverse == c])[:q] for c, q in enumerate(quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified (train_idx, val_idx): sorted, disjoint, covering all of labels."""
    labels = np.asarray(labels)
    if not 0 <= val_size < len(labels):
        raise ValueError(f"val_size must be in [0, {len(labels)}), got {val_size}")
    all_idx = np.arange(len(labels), dtype=np.int64)
    if val_size == 0:
        return all_idx, np.empty(0, np.int64)
    val_idx = _stratified_pick(labels, all_idx, val_size, np.random.default_rng(seed))
    train_idx = np.setdiff1d(all_idx, val_idx, assume_unique=True)
    return train_idx, val_idx


def subset_indices(labels: np.ndarray, train_idx: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """train_idx, or a seeded class-stratified subset of n of them (sorted) when n is smaller."""
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if n is None or n >= len(train_idx):
        return train_idx
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    if n == 0:
        return np.empty(0, np.int64)
    return _stratified_pick(np.asarray(labels), train_idx, n, np.random.default_rng(seed))
