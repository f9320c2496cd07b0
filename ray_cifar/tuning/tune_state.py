"""Tune's own state files in OUTPUT/ray/tune, kept whole through full disks and kills (local --output only).

Tune writes its state into a staging folder and copies that folder over the experiment's at
every snapshot, file by file and in place; a resumed study copies tuner.pkl back each time too.
A full disk leaves a copy truncated or empty, and so does a driver killed during the copy (seen
after a SIGKILL: the experiment state and both searcher files at 0 bytes; pyarrow's copy_files
writes them at once, on threads). `Tuner.restore` then fails (tuner.pkl:
"EOFError: Ran out of input") or silently starts the study over (an experiment state that does
not parse). TuneStateBackup keeps, in OUTPUT/tune-state-backup/, the last copy of each file that
read back whole, and puts it back before a --resume.

With a bucket --output the state lives in the bucket, where an object is replaced whole or not
at all: nothing to keep.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import pickletools
import shutil
import time

from ray.tune import Callback

from .. import storage

BACKUP = "tune-state-backup"
TUNER = "tuner.pkl"
# What Tune.restore reads: the newest (greatest name) of each pattern. Only experiment_state is JSON;
# the searchers' states are pickles despite their .json names.
PATTERNS = {
    "experiment_state-*.json": "json",
    "basic-variant-state-*.json": "pickle",
    "search_gen_state-*.json": "pickle",
    "searcher-state-*.pkl": "pickle",
    "callback-states-*.pkl": "pickle",
    TUNER: "pickle",
}


def state_files(folder: str, pattern: str) -> list[str]:
    """The names in FOLDER Tune would read for PATTERN, oldest first (Tune takes the last)."""
    try:
        return sorted(n for n in os.listdir(folder) if fnmatch.fnmatchcase(n, pattern))
    except OSError:
        return []


def is_whole(path: str, kind: str) -> bool:
    """Whether PATH reads back as a whole JSON document or pickle. A pickle is walked opcode by opcode
    (nothing in it is run): whole when it ends exactly at its STOP."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if kind == "json":
            json.loads(data.decode("utf-8"))
            return True
        *_, last = pickletools.genops(data)
    # Unreadable, not JSON or UTF-8, an unknown opcode, ends before STOP; random bytes can break pickletools'
    # argument readers in other ways too.
    except Exception:  # noqa: BLE001
        return False
    opcode, _, position = last
    return opcode.name == "STOP" and position == len(data) - 1


class TuneStateBackup(Callback):
    """Every few seconds of a study, copies each of Tune's state files that reads back whole into OUTPUT/tune-state-backup;
    `restore()` before a --resume puts the copies back where Tune's own files are damaged."""

    def __init__(self, output: str, experiment: str | None, every_seconds: float = 5.0):
        """EXPERIMENT: Tune's experiment folder on this machine; None when it is in a bucket."""
        self.experiment = storage.local_path(experiment) if experiment else None
        self.backup = os.path.join(output, BACKUP)
        self.every_seconds, self.last, self.copied = every_seconds, 0.0, {}

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last >= self.every_seconds:
            self.save()

    def on_experiment_end(self, trials, **info):
        self.save()

    def save(self) -> None:
        self.last = time.time()
        if self.experiment is None:
            return
        for pattern, kind in PATTERNS.items():
            for name in state_files(self.experiment, pattern):
                source, tmp = os.path.join(self.experiment, name), os.path.join(self.backup, f".{name}.tmp")
                try:
                    stamp = storage.stamp(source)
                except OSError:  # gone since the listing: Tune's next snapshot writes it again
                    continue
                if self.copied.get(name) == stamp or not is_whole(source, kind):
                    continue
                try:
                    os.makedirs(self.backup, exist_ok=True)
                    shutil.copyfile(source, tmp)
                    os.replace(tmp, os.path.join(self.backup, name))
                except OSError:  # a full disk: the last whole copies stay
                    with contextlib.suppress(OSError):
                        os.remove(tmp)
                    return
                self.copied[name] = stamp

    def restore(self) -> None:
        """Before a --resume, for each kind of state file, the newest that loads. A damaged one comes back from
        its last whole copy, else it is set aside (NAME.damaged) and Tune resumes from the one before it (an
        earlier session's; the trials' own checkpoints and the recorded rows are found by trial id either way);
        one warning line each. One line and exit 2 when none of a kind loads (Tune would otherwise fail on it,
        or start the study over). Then the copies are brought up to date (a study begun before tuner.pkl was
        copied gets its copy now)."""
        from ..config import ConfigError

        if self.experiment is None:
            return
        for pattern, kind in PATTERNS.items():
            if not self._restore(pattern, kind):
                output = os.path.dirname(self.backup)
                raise ConfigError(f"no {pattern} in {self.experiment} loads (each is damaged, without a whole "
                                  f"copy in {self.backup}); Tune cannot resume this study. What it recorded is "
                                  f"whole: python -m ray_cifar.report {output} reports it; to train the "
                                  f"study again: python -m ray_cifar.tune --config {output}/config.yaml "
                                  f"--output NEW")
        self.save()

    def _restore(self, pattern: str, kind: str) -> bool:
        """Whether the newest file of PATTERN loads now (True also when Tune never wrote one). The oldest stays
        where it is, damaged or not: the one line names it on every --resume."""
        names = state_files(self.experiment, pattern)
        for name in reversed(names):  # newest first: the one Tune reads
            path, copy = os.path.join(self.experiment, name), os.path.join(self.backup, name)
            if is_whole(path, kind):
                return True
            if is_whole(copy, kind):
                shutil.copyfile(copy, path)
                print(f"[ray_cifar] warning: {path} was damaged (a full disk, or a kill while Tune wrote it); "
                      f"restored from {copy}", flush=True)
                return True
            if name == names[0]:
                return False
            os.replace(path, path + ".damaged")
            print(f"[ray_cifar] warning: {path} is damaged and has no whole copy; set aside, resuming from the one "
                  f"before it", flush=True)
        return True
