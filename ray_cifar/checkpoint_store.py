"""A one-rank trial's checkpoints, kept the way Ray Train keeps a DDP trial's: the latest and the best.

A trial of one rank trains inside its Tune trial process (ray_cifar.tuning.trial), with no Train
controller and worker group to keep its checkpoints; this store does what
`CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=tune.metric)` does for them:

    LOCATION/checkpoint_000003/state.pt    the latest finished epoch (3)
    LOCATION/checkpoint_000002/state.pt    the one before it (kept so a damaged latest leaves a state to load)
    LOCATION/checkpoint_000001/state.pt    the best epoch so far by tune.metric, when not one of those

LOCATION is `storage_path/trial-<trial_id>` (a path or an s3:// gs:// file:// URI), the same
folder name a DDP trial's TorchTrainer run has, so a Tune retry or a `--resume` of the study
finds the latest state by the trial id alone. A checkpoint folder appears only complete: it is
written under a temporary name and renamed (locally), or its one file is uploaded last (URIs,
where an object appears whole), and read back before older ones are dropped.

`newest_loadable_state(location)` is how both trial paths resume: the newest checkpoint under
LOCATION that loads (Ray Train's `checkpoint_<time>` folders or this store's `checkpoint_<epoch>`),
passing over damaged ones with a warning. No Ray, no torch beyond ray_cifar.checkpoint.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from typing import Any

import pyarrow.fs as pafs

from . import checkpoint, storage

_NAME = re.compile(r"^checkpoint_(\d{6})$")
_ANY_CHECKPOINT = re.compile(r"^checkpoint_[0-9][0-9_.-]*$")  # ours (epoch) and Ray Train's (time): both sort by age


def _load_folder(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """The training state in checkpoint folder `path` of `fs`: read in place when local, else copied here first."""
    if isinstance(fs, pafs.LocalFileSystem):
        return checkpoint.load_state(path)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (checkpoint.STATE_FILE, checkpoint.CHECKSUM_FILE):
            try:
                pafs.copy_files(posixpath.join(path, name), os.path.join(tmp, name), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
            except (OSError, FileNotFoundError):
                if name == checkpoint.STATE_FILE:
                    raise checkpoint.CheckpointDamaged(f"{path}/{name}: missing") from None
        return checkpoint.load_state(tmp)


def checkpoint_folder_names(fs: pafs.FileSystem, path: str) -> list[str]:
    """The checkpoint folders in `path` of `fs`, ours (checkpoint_<epoch>) and Ray Train's (checkpoint_<time>),
    newest first: both names sort by age."""
    names = (posixpath.basename(i.path) for i in storage.children(fs, path) if i.type == pafs.FileType.Directory)
    return sorted((n for n in names if _ANY_CHECKPOINT.match(n)), reverse=True)


def newest_loadable_state(location: str, warn=print, before_epoch: int | None = None) -> tuple[str, dict[str, Any]] | None:
    """(checkpoint folder as path or URI, its state) of the newest checkpoint under `location` that loads
    (and, with `before_epoch`, is of an earlier epoch), else None (none there, or every one damaged: the
    caller starts over). See checkpoint.newest_loadable."""
    fs, path = storage.filesystem(location)
    names = checkpoint_folder_names(fs, path)
    candidates = ((storage.join(location, n), lambda n=n: _load_folder(fs, posixpath.join(path, n))) for n in names)
    return checkpoint.newest_loadable(candidates, warn, before_epoch)


class CheckpointStore:
    def __init__(self, location: str):
        self.location = location
        self.fs, self.path = storage.filesystem(location)

    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint, oldest first."""
        names = [posixpath.basename(i.path) for i in storage.children(self.fs, self.path)
                 if i.type == pafs.FileType.Directory]
        epochs = sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)
        files = self.fs.get_file_info([self._file(e) for e in epochs])
        return [e for e, info in zip(epochs, files) if info.type == pafs.FileType.File]

    def _dir(self, epoch: int) -> str:
        return posixpath.join(self.path, f"checkpoint_{epoch:06d}")

    def _file(self, epoch: int) -> str:
        return posixpath.join(self._dir(epoch), checkpoint.STATE_FILE)

    def uri(self, epoch: int) -> str:
        """The checkpoint folder of `epoch` as its user sees it (path or URI): what rows record."""
        return storage.join(self.location, f"checkpoint_{epoch:06d}")

    def latest(self, warn=print) -> dict[str, Any] | None:
        """The training state of the newest checkpoint that loads, or None before the first (or if none loads)."""
        found = newest_loadable_state(self.location, warn)
        return {**found[1], "loaded_from": found[0]} if found else None

    def save(self, directory: str, epoch: int, best_epoch: int | None) -> str:
        """Store the checkpoint folder `directory` of `epoch`; once it reads back whole, drop every other
        epoch but the previous latest and `best_epoch`. Returns the stored checkpoint's path or URI."""
        previous = [e for e in self.epochs() if e < epoch][-1:]
        local = storage.local_path(self.location)
        if local is not None:
            os.makedirs(local, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".saving-", dir=local)
            try:
                for name in os.listdir(directory):  # file by file: an OSError (ENOSPC) as itself, not shutil.Error
                    shutil.copyfile(os.path.join(directory, name), os.path.join(staging, name))
                checkpoint.verify(staging)  # what landed on disk is what was written
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)  # a full disk: the older checkpoints stay as they were
                raise
            shutil.rmtree(self._dir(epoch), ignore_errors=True)  # a retry that reached this epoch again
            os.replace(staging, self._dir(epoch))
        else:
            self.fs.create_dir(self._dir(epoch), recursive=True)
            # The checksum first, the state last: a state file there is a whole one.
            for name in (checkpoint.CHECKSUM_FILE, checkpoint.STATE_FILE):
                pafs.copy_files(os.path.join(directory, name), posixpath.join(self._dir(epoch), name),
                                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        for old in self.epochs():
            if old not in (epoch, best_epoch, *previous):
                storage.delete_folder(self.fs, self._dir(old))
        return self.uri(epoch)


    def ended(self, best: str | None) -> None:
        """The trial ended (it finished, or its scheduler stopped it): drop the checkpoint before the latest, kept
        against a damaged latest for the trial's resume, which will not come. The latest stays (the rows of a
        study whose results are damaged come back from its history), and so does `best` (the path or URI of the
        best checkpoint, as its rows record it: test and report read it). A folder deleted meanwhile is not an
        error."""
        keep = posixpath.basename((best or "").rstrip("/"))
        for old in self.epochs()[:-1]:
            if posixpath.basename(self._dir(old)) != keep:
                storage.delete_folder(self.fs, self._dir(old))


def copy_latest_state(source: str, destination: str, warn=print, before_epoch: int | None = None) -> bool:
    """Copy the newest checkpoint under `source` that loads (a trial's run folder: CheckpointStore's
    checkpoint_000003 or Ray Train's checkpoint_<date>) to `destination`/state.pt. False if none loads.

    `source` belongs to another trial that keeps training (PBT's donor): a checkpoint it deletes while
    this reads it counts as one that does not load, and the next older one is taken. The donor may also
    be epochs past the result that made it a donor (its results reach the driver late): `before_epoch`
    (its last epoch) passes over a finished state, which would leave the copy nothing to train."""
    found = newest_loadable_state(source, warn, before_epoch)
    if found is None:
        return False
    local = storage.local_path(destination)
    if local is not None:
        checkpoint.save_state(found[1], local)  # atomic: a reader never sees half a file
        return True
    fs, path = storage.filesystem(destination)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save_state(found[1], tmp)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(os.path.join(tmp, checkpoint.STATE_FILE), posixpath.join(path, checkpoint.STATE_FILE),
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return True


def has_checkpoint(location: str) -> bool:
    """Whether a run folder holds any checkpoint folder (a listing: nothing is read)."""
    fs, path = storage.filesystem(location)
    infos = storage.children(fs, path)
    return any(i.type == pafs.FileType.Directory and _ANY_CHECKPOINT.match(posixpath.basename(i.path)) for i in infos)


def remove_state_at(location: str) -> None:
    """Delete `location` (copy_latest_state's destination), if it is there."""
    storage.delete_folder(*storage.filesystem(location))


def keep_only(location: str, keep: str | None) -> None:
    """Delete the run folder `location` (a path or URI), all but its checkpoint folder named `keep` (None: the
    whole folder). What is not there is not an error."""
    fs, path = storage.filesystem(location)
    if keep is None:
        storage.delete_folder(fs, path)
        return
    for info in storage.children(fs, path):
        if posixpath.basename(info.path) != keep:
            storage.delete_folder(fs, info.path) if info.type == pafs.FileType.Directory else fs.delete_file(info.path)


def load_state_at(location: str) -> dict[str, Any] | None:
    """The training state in `location`/state.pt (a path or URI; copy_latest_state's destination), or None."""
    local = storage.local_path(location)
    if local is not None:
        return checkpoint.load_state(local) if os.path.exists(os.path.join(local, checkpoint.STATE_FILE)) else None
    fs, path = storage.filesystem(location)
    source = posixpath.join(path, checkpoint.STATE_FILE)
    if fs.get_file_info(source).type != pafs.FileType.File:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(source, os.path.join(tmp, checkpoint.STATE_FILE), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return checkpoint.load_state(tmp)
