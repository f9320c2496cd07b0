"""Full training state: everything needed to continue a run at the next epoch. No Ray, no DALI.

A checkpoint is nanoGPT's `{model, optimizer, iter_num, best_val_loss, config}` and a
little more: the scheduler, the fp16 grad scaler, the epoch just finished, the optimizer
step, the best value of `tune.metric` so far (and its epoch), and the per-epoch metrics
history (so rows reported just before a crash can be recovered). Lookahead's slow weights
travel inside its optimizer state dict.

Files are loaded with `torch.load(..., weights_only=True)`: a checkpoint holds tensors,
numbers, strings, lists and dicts only, never pickled code.

Damage: beside state.pt lies state.pt.sha256, its checksum. A file whose bytes do not match
(truncated, zeroed, overwritten) is `CheckpointDamaged`: an older checkpoint may be loaded
instead (`newest_loadable`). A file whose bytes match but that torch cannot load was written
by another version of the format (`CheckpointFormatError`): an older one would not load either.
A checkpoint without a checksum (older ray_cifar) that does not load counts as damaged.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import storage

STATE_FILE = "state.pt"
CHECKSUM_FILE = STATE_FILE + ".sha256"


class CheckpointDamaged(Exception):
    """A state file that is missing, truncated or whose bytes are not the ones written."""


class CheckpointFormatError(Exception):
    """A state file whose bytes are intact but that cannot be loaded: another version's format."""


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, *, epoch: int, step: int,
                   best: dict[str, Any], history: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The state after `epoch` epochs (1-based count of finished epochs) and `step` optimizer steps."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "best": dict(best),
        "history": [dict(h) for h in history],
        "config": config,
    }


def _replace_atomically(tmp: str, path: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the whole new one
    os.replace(tmp, path)


@contextlib.contextmanager
def _placing(directory: str) -> Iterator[dict[str, str]]:
    """Temporary paths in DIRECTORY for the state and its checksum, to be written in the block: when it ends
    without an error they replace the two files, state first, each fsynced first; whatever is left is removed."""
    os.makedirs(directory, exist_ok=True)
    tmp = {name: os.path.join(directory, f"{name}.tmp-{os.getpid()}") for name in (STATE_FILE, CHECKSUM_FILE)}
    try:
        yield tmp
        for name, path in tmp.items():
            _replace_atomically(path, os.path.join(directory, name))
    finally:
        for leftover in tmp.values():
            if os.path.exists(leftover):
                os.remove(leftover)


def save_state(state: dict[str, Any], directory: str) -> str:
    """Write `state` and its checksum into `directory` (atomically: a reader never sees half a file).

    The state is read back (its checksum recomputed from disk) before it replaces the previous one,
    so a full disk or a short write leaves the previous state in place and raises OSError."""
    with _placing(directory) as tmp:
        try:
            torch.save(state, tmp[STATE_FILE])
        except RuntimeError as e:  # torch's zip writer reports a failed write (ENOSPC, EIO) as RuntimeError
            raise _write_error(e, tmp[STATE_FILE]) from None
        digest = storage.file_sha256(tmp[STATE_FILE])
        with open(tmp[CHECKSUM_FILE], "w") as f:
            f.write(digest + "\n")
    return os.path.join(directory, STATE_FILE)


def link_state(source: str, directory: str) -> str:
    """The checkpoint save_state just wrote into `source`, also in `directory`, without writing it again: hard
    links where the filesystem has them, else a copy; atomically, as save_state. A run's best epoch is most
    often its latest: its 90 MB ResNet-18 state was saved, read back and fsynced twice an epoch.

    save_state replaces a file by a new one, never in place, so a later save into `source` leaves
    `directory`'s bytes as they are."""
    import shutil

    with _placing(directory) as tmp:
        for name, path in tmp.items():
            try:
                os.link(os.path.join(source, name), path)
            except OSError:  # no hard links here (some network and FUSE filesystems); a full disk fails again below
                shutil.copyfile(os.path.join(source, name), path)
    return os.path.join(directory, STATE_FILE)


def _write_error(e: RuntimeError, path: str) -> OSError:
    """torch.save's RuntimeError as the OSError it was (ENOSPC when the disk is full)."""
    import errno
    import shutil

    try:
        full = shutil.disk_usage(os.path.dirname(path) or ".").free < (1 << 20)
    except OSError:
        full = False
    code = errno.ENOSPC if full or "No space" in str(e) else errno.EIO
    return OSError(code, os.strerror(code), path)


def verify(directory: str) -> None:
    """Raise CheckpointDamaged unless `directory` holds a state file whose bytes match its checksum
    (a state file without a checksum passes here: load_state decides)."""
    path = os.path.join(directory, STATE_FILE)
    try:
        actual = storage.file_sha256(path)
    except OSError as e:
        raise CheckpointDamaged(f"{path}: {e.strerror or e}") from None
    try:
        with open(os.path.join(directory, CHECKSUM_FILE), "rb") as f:
            expected = f.read(200).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        return
    except OSError as e:
        raise CheckpointDamaged(f"{path}: its checksum cannot be read ({e.strerror or e})") from None
    if actual != expected:
        raise CheckpointDamaged(f"{path}: damaged (its bytes do not match {CHECKSUM_FILE})")


def load_state(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state in `directory`; CheckpointDamaged or CheckpointFormatError when it cannot be used."""
    verify(directory)
    path = os.path.join(directory, STATE_FILE)
    checked = os.path.exists(os.path.join(directory, CHECKSUM_FILE))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if checked:
            raise CheckpointFormatError(f"{path}: intact but not loadable by this version ({message})") from None
        raise CheckpointDamaged(f"{path}: cannot be loaded ({message})") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise (CheckpointFormatError if checked else CheckpointDamaged)(f"{path}: not a training state")
    return state


def newest_loadable(candidates: Iterable[tuple[str, Callable[[], dict[str, Any]]]],
                    warn: Callable[[str], None] = print,
                    before_epoch: int | None = None) -> tuple[str, dict[str, Any]] | None:
    """The first of `candidates` (name, load), newest first, that loads: (name, state), or None if none does.

    Damaged ones are passed over, said in one warning line (which, and where the run goes on from);
    a format error is raised (an older checkpoint of the same run has the same format). With `before_epoch`,
    states at that epoch or later are passed over too (PBT's donor: a copy must leave epochs to train)."""
    damaged: list[str] = []
    for name, load in candidates:
        try:
            state = load()
        except CheckpointDamaged as e:
            damaged.append(str(e))
            continue
        if before_epoch is not None and state["epoch"] >= before_epoch:
            continue
        if damaged:
            warn(f"[ray_cifar] warning: checkpoint {_damaged(damaged)}; resuming from {name} "
                 f"(epoch {state['epoch']}), the newest checkpoint that loads")
        return name, state
    if damaged:
        warn(f"[ray_cifar] warning: no checkpoint of this run loads (checkpoint {_damaged(damaged)}); starting over")
    return None


def _damaged(reasons: list[str]) -> str:
    """The newest damaged checkpoint's reason, and how many older ones were damaged too."""
    return reasons[0] + (f", and {len(reasons) - 1} older one(s) damaged too" if len(reasons) > 1 else "")


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler) -> None:
    """Load a training state into freshly built objects (same device).

    The objects' own hyper-parameters win over the state's: torch's load_state_dict would put back the
    saved lr, weight decay and momentum of every param group and the schedule's base lr, but the state
    may come from another run with other values (PBT's exploit: the donor's state, this trial's values).
    The schedule goes on at the state's step, scaled to this config's peak lr. Resuming a run of the
    same config changes nothing."""
    fresh_groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                    for g in optimizer.param_groups]
    fresh_base_lrs = list(scheduler.base_lrs)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    scheduler.base_lrs = fresh_base_lrs
    for group, hyper, base_lr, multiplier in zip(optimizer.param_groups, fresh_groups, fresh_base_lrs,
                                                  scheduler.lr_lambdas):
        group.update(hyper, initial_lr=base_lr, lr=base_lr * multiplier(scheduler.last_epoch))
    _steps_where_capturable_needs_them(getattr(optimizer, "base", optimizer))  # (Lookahead's own state: no steps)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _steps_where_capturable_needs_them(optimizer: torch.optim.Optimizer) -> None:
    """A capturable group (ASGD on CUDA) needs its step counts on its parameters' device. torch's load_state_dict
    leaves them where the saving optimizer kept them: on the CPU where that one was not capturable (a state
    saved on a CPU, say), and the first step would then fail."""
    for group in optimizer.param_groups:
        if group.get("capturable"):
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if torch.is_tensor(step) and step.device != p.device:
                    optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
