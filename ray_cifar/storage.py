"""Where data and results live: a local path or a URI (`s3://`, `gs://`, `file://`), via pyarrow.fs.

pyarrow's filesystems are what Ray Train's `storage_path` uses, so one URI names the same
place for our Parquet files and for Ray's checkpoints. The convention on a cluster:

- `--data URI`: each node copies train.parquet and test.parquet once into its local cache
  (`fetch_data`); a plain path is read in place and must exist on every node.
- `--output URI`: results go there (`sync_up`); a plain local path is refused on a
  multi-node cluster (`check_output_shared`). A `file://` URI is the user saying "this path
  is mounted on every node" (NFS and the like); a plain path says nothing of the kind.

No Ray here: this module is usable (and tested) alone.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import errno
import functools
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import urllib.parse

import pyarrow.fs as pafs

DATA_FILES = ("train.parquet", "test.parquet")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# What a bucket's filesystem is made from besides its URI (CLOUD_STORAGE_EMULATOR_ENDPOINT: a GCS server elsewhere).
_CREDENTIALS = ("AWS_", "GOOGLE_", "GCS_", "CLOUD_STORAGE_")


class StorageError(Exception):
    """A location that cannot be used as asked; the message is one line for the user."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(Exception):
    """A write failed for want of space; the message (one line) names the path and how to go on."""


def disk_full_message(e: OSError, output: str) -> str:
    """One line: the disk is full, and the file that could not be written (else the output folder)."""
    return f"the disk is full: could not write {e.filename or output} ({e.strerror or e})"


def file_sha256(path: str) -> str:
    """sha256 hex of a local file's bytes (a checkpoint's state file, the decode cache)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_uri(location: str) -> bool:
    """`s3://b/x`, `gs://b/x`, `file:///x`: True; `/x`, `x`, `C:\\x`: False."""
    return bool(_URI.match(location))


def local_path(location: str) -> str | None:
    """The local filesystem path of a plain path or a `file://` URI; None for remote URIs."""
    if not is_uri(location):
        return os.path.abspath(os.path.expanduser(location))
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme != "file":
        return None
    return urllib.parse.unquote(parsed.path)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a path or URI."""
    path = local_path(location)
    if path is not None:
        return pafs.LocalFileSystem(), path
    parsed = urllib.parse.urlparse(location)
    try:
        if parsed.scheme not in ("s3", "gs", "gcs") or not parsed.netloc:
            return pafs.FileSystem.from_uri(location)
        root = urllib.parse.urlunparse((parsed.scheme, parsed.netloc, "", "", parsed.query, ""))
        credentials = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CREDENTIALS)))
        fs = _remote_filesystem(root, credentials)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"cannot open {location}: {e}") from None
    return fs, (parsed.netloc + urllib.parse.unquote(parsed.path)).rstrip("/")  # as pyarrow's from_uri names it


@functools.lru_cache(maxsize=16)
def _remote_filesystem(root: str, credentials: tuple) -> pafs.FileSystem:
    # One per bucket (and credentials): making one from a URI asks the bucket for its region, a round trip that
    # every results row's copy paid.
    fs = pafs.FileSystem.from_uri(root)[0]
    # Let them go before pyarrow finalizes S3 at exit (registered after its own hook, so run before it): an S3
    # filesystem alive then has hung interpreters' exits in some pyarrow releases.
    atexit.register(_remote_filesystem.cache_clear)
    return fs


_SCHEMES = {"s3": "s3", "gcs": "gs"}  # pyarrow filesystem type_name -> URI scheme


def location_in(fs: pafs.FileSystem, path: str) -> str:
    """A path inside pyarrow filesystem `fs` as a location ray_cifar opens: `s3://bkt/x` for `bkt/x` on S3 (Ray
    Train's Checkpoint.path is such a path, without its scheme), the path itself on the local filesystem."""
    if isinstance(fs, pafs.LocalFileSystem) or is_uri(path):
        return path
    scheme = _SCHEMES.get(fs.type_name)
    if scheme is None:
        raise StorageError(f"cannot name {path} of a {fs.type_name} filesystem as a URI (s3:// and gs:// are known)")
    return f"{scheme}://{path}"


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a path or a URI (URIs always join with '/')."""
    return posixpath.join(location, *parts) if is_uri(location) else os.path.join(location, *parts)


def is_empty(location: str) -> bool:
    """True when nothing is at `location` or it is an empty folder (a fresh --output)."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type != pafs.FileType.Directory:
        return False
    return not children(fs, path)


def children(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The files and folders directly in folder `path` of `fs` (none when it is not there).

    A bucket has no folders: a folder is a prefix of object names, sometimes with a marker object of its own.
    pyarrow lists a folder without a marker on S3, but not on GCS (its listing keeps objects and drops the
    prefixes), where what ray_cifar uploads file by file has none: there, everything under `path` is listed and
    its first level kept."""
    if fs.type_name != "gcs":
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    found: dict[str, pafs.FileInfo] = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        name, _, below = info.path[len(path.rstrip("/")) + 1:].partition("/")
        if below or info.type == pafs.FileType.Directory:
            found[name] = pafs.FileInfo(posixpath.join(path, name), pafs.FileType.Directory)
        else:
            found[name] = info
    return list(found.values())


def delete_folder(fs: pafs.FileSystem, path: str) -> None:
    """Delete folder `path` of `fs` and everything in it; not there is not an error."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return
    try:
        fs.delete_dir(path)
    except FileNotFoundError:  # GCS: everything in it is deleted, then its marker object, which it may not have
        pass


def check_output_shared(output: str, num_nodes: int) -> None:
    """Refuse a plain local --output on a cluster of more than one node (or that an autoscaler can grow to more),
    before any work."""
    if num_nodes > 1 and not is_uri(output):
        raise StorageError(
            f"--output {output} is a local path but the Ray cluster has up to {num_nodes} nodes: checkpoints "
            f"written on other nodes would be lost; give storage every node shares: s3://BUCKET/DIR, "
            f"gs://BUCKET/DIR, or file:///PATH mounted on every node")


def _listing(fs: pafs.FileSystem, folder: str, location: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info([posixpath.join(folder, name) for name in DATA_FILES])
    missing = [name for name, info in zip(DATA_FILES, infos) if info.type != pafs.FileType.File]
    if missing:
        raise StorageError(f"{location} has no {' or '.join(missing)}: --data URIs must name a folder "
                           f"holding the Hugging Face CIFAR-10 Parquet files {' and '.join(DATA_FILES)}")
    return infos


def fetch_data(location: str, cache_dir: str) -> str:
    """A local folder with the data at `location`: the path itself, or this node's copy of a URI.

    A URI's files are copied once per node into `cache_dir/data/<key>`, where the key hashes
    the URI with each file's size and modification time (changed data is fetched again). Safe
    when several processes on a node race: each copies into its own temporary folder and
    renames it into place; the first rename wins and the others use the winner's copy.
    """
    if not is_uri(location):
        return local_path(location)
    fs, folder = filesystem(location)
    infos = _listing(fs, folder, location)
    stamp = "\n".join(f"{i.path} {i.size} {i.mtime_ns}" for i in infos)
    key = hashlib.sha256(f"{location}\n{stamp}".encode()).hexdigest()[:16]
    target = os.path.join(os.path.expanduser(cache_dir), "data", key)
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}-", dir=os.path.dirname(target))
    try:
        for info in infos:
            pafs.copy_files(info.path, os.path.join(staging, info.base_name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        os.rename(staging, target)  # atomic; fails when another process already renamed its copy
    except OSError:
        if not os.path.isdir(target):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def sync_up(local_dir: str, location: str, copied: dict[str, tuple[int, int]] | None = None) -> None:
    """Copy every file under `local_dir` to the same relative paths under `location` (overwriting).

    With `copied` (a relative path -> the (mtime_ns, size) of the file when it was copied; updated here): only the
    files new or changed since, so a study's copy each minute costs what changed (the running trials' TensorBoard
    files, the newest rows), not the whole folder (every trial's TensorBoard file, all rows) every minute."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(local_dir) == os.path.abspath(path):
        return
    if copied is None:
        fs.create_dir(path, recursive=True)
        pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    changed = {}
    for root, _, names in os.walk(local_dir):
        for name in names:
            if name.endswith(".tmp") or ".tmp-" in name:
                continue  # being written: its whole file comes under its own name
            local_file = os.path.join(root, name)
            relative = os.path.relpath(local_file, local_dir).replace(os.sep, "/")
            try:
                if copied.get(relative) != stamp(local_file):
                    changed[relative] = local_file
            except FileNotFoundError:
                continue  # gone since it was listed (a results part merged away)

    def copy(relative: str) -> None:
        try:
            upload(changed[relative], location, relative, copied)
        except FileNotFoundError:
            pass  # merged away since

    # A few at a time: each copy is several round trips to the bucket (as pyarrow's copy of a whole folder does).
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(copy, relative) for relative in sorted(changed)]:
            future.result()


def upload(local_file: str, location: str, relative: str, copied: dict[str, tuple[int, int]] | None = None) -> None:
    """Copy one local file to `location/relative` ('/'-separated); at a URI the object appears whole. With `copied`
    (sync_up's record), note it there as copied in the state it had when its copy began."""
    before = stamp(local_file) if copied is not None else None
    fs, path = filesystem(location)
    target = posixpath.join(path, relative)
    if isinstance(fs, pafs.LocalFileSystem):  # a bucket has no folders (making their markers cost round trips)
        fs.create_dir(posixpath.dirname(target), recursive=True)
    pafs.copy_files(local_file, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    if copied is not None:
        copied[relative] = before


def stamp(local_file: str) -> tuple[int, int]:
    """What tells a changed file from the one copied: (mtime in ns, size)."""
    stat = os.stat(local_file)
    return stat.st_mtime_ns, stat.st_size


def prune(local_dir: str, location: str, folder: str) -> None:
    """Delete the files of `location/folder` that `local_dir/folder` no longer has (results parts merged by
    compaction: sync_up copies, it never deletes)."""
    fs, path = filesystem(location)
    for info in fs.get_file_info(pafs.FileSelector(posixpath.join(path, folder), allow_not_found=True)):
        if info.type == pafs.FileType.File and not os.path.exists(os.path.join(local_dir, folder, info.base_name)):
            fs.delete_file(info.path)


def sync_down(location: str, local_dir: str, skip: tuple[str, ...] = ("ray",)) -> None:
    """Copy every file under `location` to `local_dir` (same relative paths), except the top-level
    folders in `skip` (Ray's own files stay where Ray reads them: at the URI)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    for info in infos:
        relative = posixpath.relpath(info.path, path)
        if info.type != pafs.FileType.File or relative.split("/")[0] in skip:
            continue
        target = os.path.join(local_dir, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pafs.copy_files(info.path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
