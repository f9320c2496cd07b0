"""Full-state checkpoints in one process (no Ray): a run stopped after epoch k and resumed from its
checkpoint ends with exactly the weights and metrics of the uninterrupted run, on the torch pipeline.

Augmentation, batch order and dropout are functions of (seed, epoch, rank), and the checkpoint holds
the model, optimizer (Lookahead's slow weights too), scheduler and step, so CPU fp32 results repeat
bit for bit: the comparison is exact (torch.equal), not within a tolerance.
"""

from __future__ import annotations

import pytest
import torch

from conftest import EXACT_METRICS, TINY_MODEL, synthetic_cifar
from ray_cifar import checkpoint
from ray_cifar.validation import load_config
from ray_cifar.data.loader import make_splits
from ray_cifar.loop import run_training
from ray_cifar.data.pipelines import train_loader_for

SETS = TINY_MODEL + ["train.epochs=4", "train.global_batch_size=50", "data.val_size=100", "data.pipeline=torch",
                     "train.amp=fp32", "model.dropout=0.2", "train.torch_threads=1", "data.autoaugment=cifar10"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("extra", [[], ["optim.lookahead_k=3", "optim.name=adam", "optim.lr=0.003"]],
                         ids=["sgd", "lookahead-adam"])
def test_resume_after_epoch_2_continues_exactly(tmp_path, extra):
    cfg = load_config(None, SETS + extra)
    splits = make_splits(synthetic_cifar(400, 50), cfg.data, "cpu")
    cpu = torch.device("cpu")
    full: list[dict] = []
    loader = train_loader_for(cfg, splits.train, cpu, log=None)
    model = run_training(cfg, loader, splits.val, cpu, on_epoch=lambda m, state: full.append(m), log=None)

    def stop_after_2(metrics, state):
        if metrics["epoch"] == 2:
            checkpoint.save_state(state(), str(tmp_path))
            raise Killed

    with pytest.raises(Killed):
        run_training(cfg, loader, splits.val, cpu, on_epoch=stop_after_2, log=None)
    state = checkpoint.load_state(str(tmp_path))  # weights_only=True
    assert state["epoch"] == 2 and len(state["history"]) == 2 and state["config"] == cfg.to_dict()
    resumed: list[dict] = []
    resumed_model = run_training(cfg, loader, splits.val, cpu, on_epoch=lambda m, s: resumed.append(m), log=None,
                                 resume=state)

    assert [m["epoch"] for m in resumed] == [3, 4]
    assert [m["resumed_from_epoch"] for m in full + resumed] == [0, 0, 0, 0, 2, 2]
    for got, want in zip(resumed, full[2:]):
        for key in EXACT_METRICS:
            assert got[key] == want[key], key
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name



def test_a_run_resumed_at_its_end_reports_its_last_epoch_again(tmp_path):
    """A state whose epoch is the run's last (a driver died after the final checkpoint; a PBT member copied a donor
    that had just finished) trains nothing, but its result still arrives: Tune needs the metric of every run."""
    cfg = load_config(None, SETS + ["train.epochs=2"])
    splits = make_splits(synthetic_cifar(400, 50), cfg.data, "cpu")
    cpu = torch.device("cpu")
    loader = train_loader_for(cfg, splits.train, cpu, log=None)
    states: list[dict] = []
    run_training(cfg, loader, splits.val, cpu, on_epoch=lambda m, state: states.append(state()), log=None)
    again: list[tuple[dict, dict]] = []
    run_training(cfg, loader, splits.val, cpu, on_epoch=lambda m, state: again.append((m, state())), log=None,
                 resume=states[-1])
    assert len(again) == 1
    metrics, state = again[0]
    assert metrics == states[-1]["history"][-1] and metrics["epoch"] == 2 and state["epoch"] == 2
    # Reported again by a run that began at epoch 2, it still says where the run that trained it began (a PBT
    # member's first epoch after an exploit: the donor's epoch, where the report draws the exploit from).
    assert metrics["resumed_from_epoch"] == 0
    again.clear()
    run_training(cfg, loader, splits.val, cpu, on_epoch=lambda m, state: again.append((m, state())), log=None,
                 resume={**states[0], "history": []})  # a copy of epoch 1, as PBT adopts it
    assert [m["resumed_from_epoch"] for m, _ in again] == [1]
    run_training(cfg, loader, splits.val, cpu, on_epoch=lambda m, state: again.append((m, state())), log=None,
                 resume=again[-1][1])
    assert [(m["epoch"], m["resumed_from_epoch"]) for m, _ in again] == [(2, 1), (2, 1)]

def test_a_non_finite_loss_ends_the_run_as_diverged():
    cfg = load_config(None, SETS + ["optim.lr=1e9", "model.dropout=0"])
    splits = make_splits(synthetic_cifar(400, 50), cfg.data, "cpu")
    epochs: list[dict] = []
    loader = train_loader_for(cfg, splits.train, torch.device("cpu"), log=None)
    run_training(cfg, loader, splits.val, torch.device("cpu"), on_epoch=lambda m, s: epochs.append((m, s())),
                 log=None)
    assert [m["diverged"] for m, _ in epochs] == [True]
    # Its val_acc is a number (a constant prediction's), but no score: the state has no best epoch (the store and
    # train's best/ keep no checkpoint of NaN weights as the best).
    assert epochs[0][0]["val_acc"] >= 0 and epochs[0][1]["best"] == {"value": None, "epoch": None}


def test_a_train_run_that_diverged_at_once_evaluates_nothing_on_test(tmp_path, capsys):
    """Its only epoch scored nothing, so it has no best/ checkpoint: before, that epoch's NaN weights were its best
    and were evaluated on the test split."""
    from ray_cifar import train

    cfg = load_config(None, SETS + ["optim.lr=1e9", "model.dropout=0", "train.epochs=2"])
    rows = train.run_local(cfg, synthetic_cifar(400, 50), str(tmp_path), run_id="r")
    assert [r["diverged"] for r in rows] == [True]
    assert not (tmp_path / "test.json").exists() and not (tmp_path / "checkpoints" / "best").exists()
    assert "no epoch scored (the run diverged in its first): the test split is not evaluated" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["path", "uri"])
def test_checkpoint_store_keeps_the_latest_and_the_best_and_resumes_from_the_latest(tmp_path, monkeypatch, kind):
    """A one-rank trial's store (no Ray): what Ray Train's CheckpointConfig(num_to_keep=1, score) keeps for a
    DDP trial. `uri` goes through the pyarrow upload/download branch that s3:// and gs:// locations take."""
    from ray_cifar import checkpoint_store, storage

    location = str(tmp_path / "trial-x")
    if kind == "uri":
        monkeypatch.setattr(checkpoint_store.storage, "local_path", lambda loc: None)
        location = "file://" + location
    store = checkpoint_store.CheckpointStore(location)
    assert store.latest() is None  # before the first epoch (the folder does not exist yet)

    best_after = {1: 1, 2: 1, 3: 3, 4: 3}  # epoch -> the best epoch so far
    for epoch, best in best_after.items():
        made = tmp_path / f"made-{epoch}"
        checkpoint.save_state({"epoch": epoch, "best": {"epoch": best}, "weights": torch.full((2,), float(epoch))},
                              str(made))
        path = store.save(str(made), epoch, best)
        assert path == storage.join(location, f"checkpoint_{epoch:06d}")
    kept = sorted(p.name for p in (tmp_path / "trial-x").iterdir())
    assert kept == ["checkpoint_000003", "checkpoint_000004"]  # the best (3) and the latest (4)
    (tmp_path / "trial-x" / "checkpoint_000005").mkdir()  # a folder whose state never arrived
    latest = store.latest()
    assert latest["epoch"] == 4 and torch.equal(latest["weights"], torch.full((2,), 4.0))
    # A retry that reaches an epoch again replaces it; the best stays.
    checkpoint.save_state({"epoch": 4, "best": {"epoch": 3}, "weights": torch.zeros(2)}, str(tmp_path / "again"))
    store.save(str(tmp_path / "again"), 4, 3)
    assert torch.equal(store.latest()["weights"], torch.zeros(2))
    assert (tmp_path / "trial-x" / "checkpoint_000003" / checkpoint.STATE_FILE).exists()


def test_a_one_process_run_stopped_while_it_saves_has_no_row_without_its_checkpoint(tmp_path, monkeypatch):
    """python -m ray_cifar.train saves an epoch's checkpoints before its row: a stop (SIGTERM is a
    KeyboardInterrupt there) in the middle of epoch 2's save leaves epoch 1's row and checkpoint, and no row of
    epoch 2. Seen in CI: stopped during epoch 1's save, the run had a row and no checkpoint at all."""
    from ray_cifar import train
    from ray_cifar.results import ResultsLog

    saves = []
    real_save = checkpoint.save_state

    def save_state(state, directory):
        saves.append(state["epoch"])
        if state["epoch"] == 2:
            raise KeyboardInterrupt  # what the signal raises, here at the save
        return real_save(state, directory)

    monkeypatch.setattr(checkpoint, "save_state", save_state)
    cfg = load_config(None, TINY_MODEL + ["train.epochs=3", "data.val_size=100", "train.global_batch_size=100",
                                          "data.pipeline=torch", "train.torch_threads=1"])
    with pytest.raises(KeyboardInterrupt):
        train.run_local(cfg, synthetic_cifar(), str(tmp_path), run_id="r")
    assert saves[-1] == 2
    assert [r["epoch"] for r in ResultsLog(str(tmp_path)).read()] == [1]
    assert checkpoint.load_state(str(tmp_path / "checkpoints" / "latest"))["epoch"] == 1


def test_the_best_checkpoint_is_the_latest_linked_not_written_again_and_keeps_its_bytes(tmp_path):
    """link_state: python -m ray_cifar.train's best/ is its latest/ when the epoch is the best, as hard links (one
    write of the state an epoch, not two); the next save into latest/ leaves best/ as it was."""
    latest, best = str(tmp_path / "latest"), str(tmp_path / "best")
    checkpoint.save_state({"epoch": 1, "weights": torch.ones(3)}, latest)
    checkpoint.link_state(latest, best)
    assert (tmp_path / "best" / checkpoint.STATE_FILE).stat().st_ino == \
        (tmp_path / "latest" / checkpoint.STATE_FILE).stat().st_ino  # the same bytes on disk, not a copy
    checkpoint.verify(best)
    checkpoint.save_state({"epoch": 2, "weights": torch.zeros(3)}, latest)
    checkpoint.verify(best)
    kept = checkpoint.load_state(best)
    assert kept["epoch"] == 1 and torch.equal(kept["weights"], torch.ones(3))
    assert checkpoint.load_state(latest)["epoch"] == 2
    checkpoint.save_state({"epoch": 3, "weights": torch.full((3,), 3.0)}, latest)
    checkpoint.link_state(latest, best)  # a later best replaces the older one
    assert checkpoint.load_state(best)["epoch"] == 3
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [checkpoint.STATE_FILE, checkpoint.CHECKSUM_FILE]


def test_a_one_process_run_writes_each_state_once(tmp_path, monkeypatch):
    """Every epoch of python -m ray_cifar.train is saved once; its best/ holds the best epoch's state."""
    from ray_cifar import train

    saves = []
    real_save = checkpoint.save_state
    monkeypatch.setattr(checkpoint, "save_state", lambda state, directory: saves.append(state["epoch"])
                        or real_save(state, directory))
    cfg = load_config(None, TINY_MODEL + ["train.epochs=3", "data.val_size=100", "train.global_batch_size=100",
                                          "data.pipeline=torch", "train.torch_threads=1"])
    rows = train.run_local(cfg, synthetic_cifar(), str(tmp_path), run_id="r")
    assert saves == [1, 2, 3]
    best = max(rows, key=lambda r: r["val_acc"])  # the first of equals, as the run keeps its best
    assert checkpoint.load_state(str(tmp_path / "checkpoints" / "best"))["epoch"] == best["epoch"]
