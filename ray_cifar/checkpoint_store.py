"""A one-rank trial's checkpoints, kept the way Ray Train keeps a DDP trial's: the latest and the best.

A trial of one rank trains inside its Tune trial process (ray_cifar.trial), with no Train
controller and worker group to keep its checkpoints; this store does what
`CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=tune.metric)` does for them:

    LOCATION/checkpoint_000003/state.pt    the latest finished epoch (3)
    LOCATION/checkpoint_000002/state.pt    the best epoch so far by tune.metric, when not the latest

LOCATION is `storage_path/trial-<trial_id>` (a path or an s3:// gs:// file:// URI), the same
folder name a DDP trial's TorchTrainer run has, so a Tune retry or a `--resume` of the study
finds the latest state by the trial id alone. A checkpoint folder appears only complete: it is
written under a temporary name and renamed (locally), or its one file is uploaded last (URIs,
where an object appears whole). No Ray, no torch beyond `checkpoint.load_state`.
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


class CheckpointStore:
    def __init__(self, location: str):
        self.location = location
        self.fs, self.path = storage.filesystem(location)

    def _epochs(self) -> list[int]:
        """Epochs with a complete checkpoint, oldest first."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        names = [posixpath.basename(i.path) for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory]
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

    def latest(self) -> dict[str, Any] | None:
        """The training state of the latest complete checkpoint, or None before the first."""
        epochs = self._epochs()
        if not epochs:
            return None
        local = storage.local_path(self.location)
        if local is not None:
            return checkpoint.load_state(os.path.join(local, f"checkpoint_{epochs[-1]:06d}"))
        with tempfile.TemporaryDirectory() as tmp:
            pafs.copy_files(self._file(epochs[-1]), os.path.join(tmp, checkpoint.STATE_FILE),
                            source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            return checkpoint.load_state(tmp)

    def save(self, directory: str, epoch: int, best_epoch: int | None) -> str:
        """Store the checkpoint folder `directory` of `epoch`; drop every other epoch but `best_epoch`.
        Returns the stored checkpoint's path or URI."""
        local = storage.local_path(self.location)
        if local is not None:
            os.makedirs(local, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".saving-", dir=local)
            shutil.copytree(directory, staging, dirs_exist_ok=True)
            shutil.rmtree(self._dir(epoch), ignore_errors=True)  # a retry that reached this epoch again
            os.replace(staging, self._dir(epoch))
        else:
            self.fs.create_dir(self._dir(epoch), recursive=True)
            pafs.copy_files(os.path.join(directory, checkpoint.STATE_FILE), self._file(epoch),
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        for old in self._epochs():
            if old not in (epoch, best_epoch):
                self.fs.delete_dir(self._dir(old))
        return self.uri(epoch)
