"""The study's bookkeeping with fake trials and synthetic results (no training, no Ray cluster),
as Ray tests its schedulers: rows, statuses, the state that survives a restore, ASHA's rungs
rebuilt from recorded rows, and the exit status."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ray_cifar.tuning import study
from ray_cifar.tuning.recorder import StudyRecorder
from ray_cifar.results import ResultsLog
from ray_cifar.tuning.scheduler import RestorableASHA


class FakeTrial:
    def __init__(self, trial_id: str, lr: float = 0.1, error_file: str | None = None):
        self.trial_id, self.config, self.error_file = trial_id, {"optim.lr": lr}, error_file


def lr_params(config: dict) -> dict:
    return {"optim.lr": config["optim.lr"]}


def no_params(config: dict) -> dict:
    return {}


def result(epoch: int, val_acc: float, **extra) -> dict:
    return {"epoch": epoch, "epochs": 4, "val_acc": val_acc, "train_loss": 1.0 / epoch, **extra}


@pytest.fixture
def recorder(tmp_path):
    return StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", {"git_sha": "x"}, tensorboard=False)


def test_rows_are_written_once_per_trial_and_epoch(recorder, tmp_path):
    trial = FakeTrial("t1")
    for epoch, acc in ((1, 0.3), (2, 0.5), (2, 0.5), (3, 0.4)):  # epoch 2 reported twice (a replayed report)
        recorder.on_trial_result(0, [], trial, result(epoch, acc))
    rows = ResultsLog(str(tmp_path)).read()
    assert sorted(r["epoch"] for r in rows) == [1, 2, 3]
    assert all(r["optim.lr"] == 0.1 and r["git_sha"] == "x" for r in rows)
    summary = recorder.trials["t1"]
    assert (summary["best_metric"], summary["best_epoch"], summary["epochs"]) == (0.5, 2, 3)


def test_a_long_study_merges_its_parts_as_it_goes(tmp_path):
    """Parts are merged every `compact_every` (a read of the log costs a file a part); with a bucket:
    test_remote_output.py."""
    rec = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False, compact_every=3)
    for epoch in range(1, 5):
        for tid in ("t1", "t2"):
            rec.on_trial_result(0, [], FakeTrial(tid), result(epoch, epoch / 10))
            assert ResultsLog(str(tmp_path)).part_count() < 3
    assert len(ResultsLog(str(tmp_path)).read()) == 8 and len(pickle.loads(pickle.dumps(rec)).seen) == 8


def test_a_bucket_that_cannot_be_written_is_one_warning_and_the_next_minute_copies_what_it_missed(tmp_path, capsys):
    output, remote = tmp_path / "out", tmp_path / "bucket" / "study"
    output.mkdir()
    remote.parent.mkdir()
    remote.write_text("a file where the study's folder should be")  # every copy to it fails
    rec = StudyRecorder(str(output), lr_params, "val_acc", "max", tensorboard=False, progress_every=0,
                        mirror_to=remote.as_uri())
    for epoch in (1, 2):
        rec.on_trial_result(0, [], FakeTrial("t1"), result(epoch, epoch / 10))
        rec.on_step_end(0, [])
    assert capsys.readouterr().out.count("warning: could not copy") == 1
    remote.unlink()
    rec.on_step_end(0, [])
    assert len(ResultsLog(str(remote)).read()) == 2 and (remote / "trials.json").exists()


def test_min_mode_picks_the_lowest_value(tmp_path):
    rec = StudyRecorder(str(tmp_path), lr_params, "train_loss", "min", tensorboard=False)
    for epoch in (1, 2, 3):
        rec.on_trial_result(0, [], FakeTrial("t"), result(epoch, 0.1))
    assert rec.trials["t"]["best_epoch"] == 3 and rec.trials["t"]["best_metric"] == pytest.approx(1 / 3)


def test_history_of_a_resumed_trial_fills_rows_the_dead_driver_never_got(recorder, tmp_path):
    trial = FakeTrial("t1")
    recorder.on_trial_result(0, [], trial, result(1, 0.3))
    # The driver died after the trial checkpointed epoch 2 but before epoch 2's report arrived.
    history = [result(1, 0.3), result(2, 0.6)]
    recorder.on_trial_result(0, [], trial, result(3, 0.7, history=history, resumed_from_epoch=2))
    assert sorted(r["epoch"] for r in ResultsLog(str(tmp_path)).read()) == [1, 2, 3]


def test_a_finished_trial_gets_back_rows_the_dead_driver_never_wrote(recorder, tmp_path, capsys):
    # Tune never runs a finished trial again: its last result, kept in Tune's state, is all that brings its last row.
    trial, running = FakeTrial("t1"), FakeTrial("t2")
    recorder.on_trial_result(0, [], trial, result(1, 0.3))
    recorder.on_trial_result(0, [], trial, result(2, 0.5))
    trial.status, trial.last_result = "TERMINATED", result(3, 0.6, checkpoint_path=str(tmp_path / "ckpt3"))
    running.status, running.last_result = "PENDING", result(1, 0.2)  # resumes, and reports its history itself
    restored = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False)  # the next driver
    restored.on_step_end(0, [trial, running])
    restored.on_step_end(1, [trial, running])  # once per driver
    rows = ResultsLog(str(tmp_path)).read()
    assert sorted((r["trial_id"], r["epoch"]) for r in rows) == [("t1", 1), ("t1", 2), ("t1", 3)]
    assert restored.trials["t1"]["best_checkpoint"] == str(tmp_path / "ckpt3")
    assert capsys.readouterr().out.count("trial t1 finished with epoch 3 unrecorded: recovered") == 1


def test_statuses_come_from_tune_events(recorder, tmp_path):
    done, stopped, diverged = FakeTrial("a"), FakeTrial("b"), FakeTrial("c")
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n")
    failed = FakeTrial("d", error_file=str(error_file))
    for t in (done, stopped, diverged, failed):
        if t is stopped:
            recorder.note_stopped(t.trial_id)  # Tune asks the scheduler before the callbacks see the result
        recorder.on_trial_result(0, [], t, result(1, 0.2, diverged=t is diverged, epochs=1 if t is done else 4))
    # Ended by its scheduler's budget at 1 of its 4 epochs (BOHB's HyperBand at max_t, tune.max_epochs below
    # train.epochs), though the scheduler never called it a stop: it was recorded `completed`.
    short = FakeTrial("e")
    recorder.on_trial_result(0, [], short, result(1, 0.3))
    for t in (done, stopped, diverged, short):
        recorder.on_trial_complete(0, [], t)
    recorder.on_trial_error(0, [], failed)
    status = {tid: s["status"] for tid, s in recorder.trials.items()}
    assert status == {"a": "completed", "b": "stopped", "c": "diverged", "d": "failed", "e": "stopped"}
    assert recorder.trials["d"]["error"] == "RuntimeError: CUDA out of memory"
    assert recorder.trials["b"]["optim.lr"] == 0.1  # the bare entry note_stopped made was filled in


def test_a_one_rank_trial_that_ended_keeps_only_its_latest_and_best_checkpoints(tmp_path):
    """The store keeps the checkpoint before the latest against a damaged latest, for a resume. Once the trial has
    ended, nothing reads it: it was a third of a one-rank study's disk. A trial the study's stop cut keeps it."""
    import torch

    from ray_cifar import checkpoint
    from ray_cifar.checkpoint_store import CheckpointStore
    from ray_cifar.tuning.trial import trainer_name

    runs = tmp_path / "ray"
    rec = StudyRecorder(str(tmp_path / "out"), lr_params, "val_acc", "max", tensorboard=False, storage_path=str(runs))
    stores = {}
    for tid, done in (("ended", True), ("cut", False)):
        stores[tid] = store = CheckpointStore(str(runs / trainer_name(tid)))
        trial = FakeTrial(tid)
        for epoch, acc in ((1, 0.6), (2, 0.4), (3, 0.5)):  # the best is epoch 1
            folder = tmp_path / f"made-{tid}-{epoch}"
            checkpoint.save_state({"epoch": epoch, "weights": torch.zeros(2)}, str(folder))
            path = store.save(str(folder), epoch, best_epoch=1)
            rec.on_trial_result(0, [], trial, result(epoch, acc, checkpoint_path=path))
        assert store.epochs() == [1, 2, 3]
        trial.status, trial.last_result = "TERMINATED", result(3, 0.5, done=done)
        rec.on_trial_complete(0, [], trial)
    assert stores["ended"].epochs() == [1, 3] and stores["cut"].epochs() == [1, 2, 3]
    assert rec.trials["ended"]["best_checkpoint"].endswith("checkpoint_000001")
    # Where the recorder keeps no stores (DDP trials, PBT) it deletes nothing.
    (tmp_path / "other").mkdir()
    other = StudyRecorder(str(tmp_path / "other"), lr_params, "val_acc", "max", tensorboard=False)
    trial = FakeTrial("cut")
    trial.status, trial.last_result = "TERMINATED", result(3, 0.5, done=True)
    other.on_trial_complete(0, [], trial)
    assert stores["cut"].epochs() == [1, 2, 3]


def test_each_trial_start_and_end_is_one_line(recorder, capsys):
    trial, stopped = FakeTrial("a"), FakeTrial("b", lr=0.001)
    recorder.on_trial_start(0, [], trial)
    recorder.on_trial_start(0, [], stopped)
    for epoch, acc in ((1, 0.3), (2, 0.5), (3, 0.4)):
        recorder.on_trial_result(0, [], trial, result(epoch, acc, epochs=3))
    recorder.note_stopped("b")
    recorder.on_trial_result(0, [], stopped, result(1, 0.1))
    recorder.on_trial_start(0, [], FakeTrial("b", lr=0.001))  # Tune starts it again after a stop and --resume
    recorder.on_trial_complete(0, [], trial)
    recorder.on_trial_complete(0, [], stopped)
    assert capsys.readouterr().out.splitlines() == [
        "[ray_cifar] trial a started: optim.lr=0.1", "[ray_cifar] trial b started: optim.lr=0.001",
        "[ray_cifar] trial b goes on (1 epoch(s) recorded): optim.lr=0.001",
        "[ray_cifar] trial a completed after 3 epoch(s); best val_acc 0.5000 at epoch 2",
        "[ray_cifar] trial b stopped by its scheduler after 1 epoch(s); best val_acc 0.1000 at epoch 1"]


def test_a_diverged_trials_nan_is_kept_in_its_row_but_not_written_to_tensorboard(tmp_path, capfd, caplog):
    """tensorboardX logged "NaN or Inf found in input tensor." for it: an unlabelled console line."""
    rec = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=True)
    rec.on_trial_result(0, [], FakeTrial("a"), result(1, 0.1, diverged=True, train_loss=float("nan"),
                                                       checkpoint_path="a/checkpoint_000001"))
    rec.on_trial_complete(0, [], FakeTrial("a"))
    assert "NaN or Inf" not in "".join(capfd.readouterr()) + caplog.text
    assert math.isnan(ResultsLog(str(tmp_path)).read()[0]["train_loss"])
    # Its val_acc (0.1) is no score: no best epoch, so no best checkpoint for the test split to evaluate.
    assert rec.trials["a"]["status"] == "diverged"
    assert (rec.trials["a"]["best_metric"], rec.trials["a"]["best_checkpoint"]) == (None, None)


def test_a_retried_trial_that_completes_is_completed(recorder):
    trial = FakeTrial("a")
    recorder.on_trial_result(0, [], trial, result(1, 0.2, epochs=1))
    recorder.on_trial_error(0, [], trial)
    recorder.on_trial_complete(0, [], trial)
    assert recorder.trials["a"]["status"] == "completed" and recorder.trials["a"]["error"] is None


def test_state_survives_pickling_as_tuner_pkl_does(recorder, tmp_path):
    scheduler = RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, metric="val_acc", mode="max",
                               max_t=4, grace_period=1, reduction_factor=2)
    recorder.on_trial_result(0, [], FakeTrial("t1"), result(1, 0.3))
    # Tuner.restore unpickles the tuner's callbacks and scheduler from one pickle, written at the start:
    restored_recorder, restored_scheduler = pickle.loads(pickle.dumps((recorder, scheduler)))
    assert restored_scheduler.on_stop.__self__ is restored_recorder  # still one object
    assert restored_recorder.trials["t1"]["epochs"] == 1  # re-read from disk
    restored_recorder.on_trial_result(0, [], FakeTrial("t1"), result(1, 0.3))  # already recorded: no new row
    restored_recorder.on_trial_result(0, [], FakeTrial("t1"), result(2, 0.4))
    assert sorted(r["epoch"] for r in ResultsLog(str(tmp_path)).read()) == [1, 2]


def _run(scheduler, trial_results, recorder=None) -> dict[str, str]:
    """Feed results in order (as Tune would); returns each trial's last decision."""
    decisions = {}
    for trial_id, epoch, acc in trial_results:
        trial = FakeTrial(trial_id)
        if epoch == 1:
            scheduler.on_trial_add(None, trial)
        res = result(epoch, acc)
        decisions[trial_id] = scheduler.on_trial_result(None, trial, res)
        if recorder is not None:
            recorder.on_trial_result(0, [], trial, res)
    return decisions


HISTORY = [("t1", 1, 0.50), ("t1", 2, 0.60), ("t2", 1, 0.40), ("t2", 2, 0.45), ("t3", 1, 0.55), ("t3", 2, 0.65)]
NEXT = [("t4", 1, 0.45), ("t4", 2, 0.50)]  # good enough for the empty rungs, not for the rebuilt ones


def test_asha_rungs_are_rebuilt_from_recorded_rows(recorder, tmp_path):
    asha_args = dict(metric="val_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2)
    original = RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, **asha_args)
    _run(original, HISTORY, recorder)
    uninterrupted = _run(original, NEXT)

    rebuilt = pickle.loads(pickle.dumps(RestorableASHA(str(tmp_path), **asha_args)))  # as restored, empty
    assert _run(rebuilt, NEXT) == uninterrupted
    assert uninterrupted["t4"] == TrialScheduler.STOP
    # Ray's own ASHA after a restore: empty rungs, so it would keep the trial.
    assert _run(ASHAScheduler(time_attr="epoch", **asha_args), NEXT)["t4"] == TrialScheduler.CONTINUE


def test_the_scheduler_reports_the_trials_it_stops(recorder, tmp_path):
    asha = RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, metric="val_acc", mode="max", max_t=8,
                          grace_period=1, reduction_factor=2)
    _run(asha, HISTORY + NEXT, recorder)
    recorder.on_trial_complete(0, [], FakeTrial("t4"))
    assert recorder.trials["t4"]["status"] == "stopped"


@pytest.mark.parametrize("failed, expected", [(False, 0), (True, 1)])
def test_exit_status_is_nonzero_when_a_trial_failed(tmp_path, recorder, capsys, failed, expected):
    from ray_cifar.validation import load_config

    recorder.on_trial_result(0, [], FakeTrial("ok"), result(1, 0.5))
    recorder.on_trial_complete(0, [], FakeTrial("ok"))
    bad = FakeTrial("bad")
    recorder.on_trial_result(0, [], bad, result(1, 0.1))
    (recorder.on_trial_error if failed else recorder.on_trial_complete)(0, [], bad)
    rc = study.finish_study(load_config(None, []), str(tmp_path), ["optim.lr"])
    out = capsys.readouterr().out
    assert rc == expected
    assert ("trial bad FAILED" in out) == failed
    assert os.path.exists(tmp_path / "trials.parquet") and os.path.exists(tmp_path / "results.parquet")


def test_replicates_get_their_own_seeds():
    from ray_cifar.validation import load_config

    grid = load_config(None, ["tune.num_samples=3", "train.seed=7",
                              "tune.search_space={optim.lr: {grid: [0.1, 0.2]}}"])
    assert study.replicate_seeds(grid) == ({"train.seed": {"grid": [7, 8, 9]}}, 1)
    random = load_config(None, ["tune.num_samples=3", "tune.search_space={optim.lr: {uniform: [0.1, 0.2]}}"])
    extra, n = study.replicate_seeds(random)
    assert n == 3 and "randint" in extra["train.seed"]
    # A study that searches train.seed itself keeps it (a seed grid with num_samples > 1 is refused: copies).
    fixed = load_config(None, ["tune.num_samples=3", "tune.search_space={train.seed: {choice: [1, 2]}}"])
    assert study.replicate_seeds(fixed) == ({}, 3)


def test_test_split_is_evaluated_for_the_best_trial_by_the_configured_metric(tmp_path, monkeypatch, capsys):
    from ray_cifar.tuning import trial as trial_mod
    from ray_cifar.validation import load_config

    rec = StudyRecorder(str(tmp_path), lr_params, "val_loss", "min", tensorboard=False)
    # Trial "hi_acc" has the best val_acc but not the lowest val_loss; "lo_loss" must win under val_loss/min.
    for tid, acc, loss in (("hi_acc", 0.9, 0.8), ("lo_loss", 0.7, 0.3), ("mid", 0.8, 0.5)):
        rec.on_trial_result(0, [], FakeTrial(tid), {"epoch": 1, "epochs": 1, "val_acc": acc, "val_loss": loss,
                                                     "checkpoint_path": f"/ckpt/{tid}"})
        rec.on_trial_complete(0, [], FakeTrial(tid))
    evaluated = []
    monkeypatch.setattr(trial_mod, "evaluate_checkpoint",
                        lambda path, split, use_gpu: evaluated.append(path) or {"test_acc": 0.5, "test_loss": 1.0})
    cfg = load_config(None, ["tune.metric=val_loss", "tune.mode=min", "train.use_gpu=false"])
    assert study.finish_study(cfg, str(tmp_path), ["optim.lr"]) == 0
    assert evaluated == ["/ckpt/lo_loss"]
    import pyarrow.parquet as pq
    ranked = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert [t["trial_id"] for t in ranked] == ["lo_loss", "mid", "hi_acc"]
    assert "judged_epoch" not in ranked[0]  # the scheduler's bookkeeping stays in trials.json
    assert ranked[0]["test_acc"] == 0.5 and ranked[1]["test_acc"] is None


def test_the_end_table_prints_the_best_trials_of_a_large_study_and_says_where_the_rest_are(tmp_path, monkeypatch,
                                                                                           capsys):
    from ray_cifar.tuning import trial as trial_mod
    from ray_cifar.validation import load_config

    rec = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False)
    n = study.CONSOLE_TRIALS + 5
    for i in range(n):
        tid = f"t{i:03d}"
        rec.on_trial_result(0, [], FakeTrial(tid), {"epoch": 1, "epochs": 1, "val_acc": 0.5 + i / 1000,
                                                     "val_loss": 1.0, "checkpoint_path": f"/ckpt/{tid}"})
        rec.on_trial_complete(0, [], FakeTrial(tid))
    monkeypatch.setattr(trial_mod, "evaluate_checkpoint", lambda path, split, use_gpu: {"test_acc": 0.5, "test_loss": 1})
    assert study.finish_study(load_config(None, ["train.use_gpu=false"]), str(tmp_path), ["optim.lr"]) == 0
    out = capsys.readouterr().out
    printed = re.findall(r"^(t\d{3}) ", out, re.MULTILINE)
    assert printed == [f"t{i:03d}" for i in range(n - 1, 4, -1)]  # the best 30, best first
    assert f"... and 5 trial(s) ranked below these: every trial is in {tmp_path}/trials.parquet and the report" in out
    import pyarrow.parquet as pq
    assert pq.read_table(tmp_path / "trials.parquet").num_rows == n


def test_a_best_trial_whose_best_checkpoint_is_unknown_is_not_replaced_by_another_on_test(tmp_path, recorder,
                                                                                        monkeypatch, capsys):
    # "best"'s best epoch came back as a history row without its checkpoint (a report lost with a driver).
    from ray_cifar.tuning import trial as trial_mod
    from ray_cifar.validation import load_config

    recorder.on_trial_result(0, [], FakeTrial("best"), result(2, 0.9, history=[result(1, 0.95)]))
    recorder.on_trial_result(0, [], FakeTrial("next"), result(1, 0.8, checkpoint_path="/ckpt/next"))
    for tid in ("best", "next"):
        recorder.on_trial_complete(0, [], FakeTrial(tid))
    evaluated = []
    monkeypatch.setattr(trial_mod, "evaluate_checkpoint",
                        lambda path, split, use_gpu: evaluated.append(path) or {"test_acc": 0.5, "test_loss": 1.0})
    study.finish_study(load_config(None, ["train.use_gpu=false"]), str(tmp_path), ["optim.lr"])
    assert evaluated == []
    assert "best trial best: the checkpoint of its best epoch (1) is not known" in capsys.readouterr().out


def test_trials_parquet_is_written_even_if_the_test_evaluation_fails(tmp_path, recorder, monkeypatch):
    from ray_cifar.tuning import trial as trial_mod
    from ray_cifar.validation import load_config

    recorder.on_trial_result(0, [], FakeTrial("a"), result(1, 0.5, checkpoint_path="/gone"))
    recorder.on_trial_complete(0, [], FakeTrial("a"))

    def broken(*args):
        raise FileNotFoundError("/gone")

    monkeypatch.setattr(trial_mod, "evaluate_checkpoint", broken)
    study.finish_study(load_config(None, ["train.use_gpu=false"]), str(tmp_path), ["optim.lr"])
    assert os.path.exists(tmp_path / "trials.parquet")


def test_a_second_driver_on_a_running_study_is_refused(tmp_path):
    import json
    import subprocess
    import sys

    from ray_cifar.config import ConfigError

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / study.DRIVER_LOCK).write_text(json.dumps({"pid": other.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(ConfigError, match=f"another driver \\(pid {other.pid}\\)"):
            study.hold_driver_lock(str(tmp_path))
    finally:
        other.kill()
        other.wait()
    study.hold_driver_lock(str(tmp_path))  # its driver is gone: this one takes over
    assert json.loads((tmp_path / study.DRIVER_LOCK).read_text())["pid"] == os.getpid()


def test_only_a_study_stopped_before_any_trial_reported_counts_as_never_started(tmp_path):
    """What --resume starts afresh from its config.yaml (no Tune experiment): a folder with the config and nothing a
    trial wrote. Rows, a part of them or trials.json mean trials ran: such a folder is not started over."""
    assert not study.never_started(str(tmp_path))  # no config.yaml: not a study at all
    (tmp_path / "config.yaml").write_text("train: {epochs: 1}\n")
    (tmp_path / "logs").mkdir()  # what the killed driver printed, and its lock, are no trial's
    (tmp_path / study.DRIVER_LOCK).write_text("{}")
    assert study.never_started(str(tmp_path))
    (tmp_path / ResultsLog.PARTS).mkdir()
    assert study.never_started(str(tmp_path))  # an empty parts folder holds no row
    for written in (f"{ResultsLog.PARTS}/part-000000.parquet", "results.parquet", "trials.json"):
        (tmp_path / written).write_bytes(b"x")
        assert not study.never_started(str(tmp_path)), written
        (tmp_path / written).unlink()


def test_a_trial_that_reaches_max_t_is_completed_where_it_ran_its_epochs_and_stopped_where_short(recorder, tmp_path):
    asha = RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, metric="val_acc", mode="max", max_t=2,
                          grace_period=1, reduction_factor=2)
    decisions = _run(asha, [("t1", 1, 0.5), ("t1", 2, 0.6)], recorder)
    assert decisions["t1"] == TrialScheduler.STOP  # ASHA's own way of ending a trial at max_t
    recorder.on_trial_complete(0, [], FakeTrial("t1"))
    # At 2 of the 4 epochs its result plans (tune.max_epochs below train.epochs): the budget ended it, not its length.
    assert recorder.trials["t1"]["status"] == "stopped"
    recorder.on_trial_result(0, [], FakeTrial("t2"), result(2, 0.6, epochs=2))
    recorder.on_trial_complete(0, [], FakeTrial("t2"))
    assert recorder.trials["t2"]["status"] == "completed"


def test_a_stop_decided_just_before_the_driver_died_holds_after_the_restore(recorder, tmp_path):
    asha_args = dict(metric="val_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2)
    original = RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, **asha_args)
    assert _run(original, HISTORY + NEXT, recorder)["t4"] == TrialScheduler.STOP
    # The driver died before Tune ended t4: the restored study resumes it at its next epoch.
    restored = pickle.loads(pickle.dumps(RestorableASHA(str(tmp_path), **asha_args)))
    restored.on_trial_add(None, FakeTrial("t5"))  # the first trial Tune adds reads the recorded stops
    assert restored.on_trial_result(None, FakeTrial("t4"), result(3, 0.9)) == TrialScheduler.STOP


def test_a_rung_met_by_an_epoch_recovered_from_a_checkpoint_stops_the_trial_after_the_restore(recorder, tmp_path):
    """Epochs a trial checkpointed whose reports died with the driver come back as rows at the next driver's first
    step (recorder._recover_unfinished: ITERATION None), decided on by no scheduler. The rebuilt rungs decide: t4's
    one recovered epoch and t6's two (a driver killed after each epoch's checkpoint, twice: seen in a kill test)
    meet rung 1 below its cutoff, so both are stopped at their next result and recorded `stopped`. Before, the rungs
    held the rows and dropped the decision: t4 and t6 trained on past the rung. t5's rows were decided on live
    (ITERATION given): that decision stands, though replayed after the others its epoch 1 meets a fuller rung."""
    asha_args = dict(metric="val_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2)
    _run(RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, **asha_args), HISTORY, recorder)
    recorder.on_trial_result(None, [], FakeTrial("t4"), result(1, 0.45))  # recovered, below rung 1's cutoff
    for epoch, acc in ((1, 0.3), (2, 0.9)):
        recorder.on_trial_result(None, [], FakeTrial("t6"), result(epoch, acc))  # recovered by two drivers
        recorder.on_trial_result(0, [], FakeTrial("t5"), result(epoch, acc))  # decided on live
    assert not study_stops(tmp_path) & {"t4", "t5", "t6"}
    assert [recorder.trials[t].get("judged_epoch") for t in ("t4", "t5", "t6")] == [None, 2, None]
    # Tuner.restore unpickles the recorder and the scheduler (whose on_stop is the recorder's) from one pickle.
    recorder, restored = pickle.loads(pickle.dumps(
        (recorder, RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, **asha_args))))
    for trial_id in ("t1", "t2", "t3", "t4", "t5", "t6"):
        restored.on_trial_add(None, FakeTrial(trial_id))
    assert restored.on_trial_result(None, FakeTrial("t1"), result(3, 0.7)) == TrialScheduler.CONTINUE
    assert restored.on_trial_result(None, FakeTrial("t5"), result(3, 0.7)) == TrialScheduler.CONTINUE
    assert restored.on_trial_result(None, FakeTrial("t4"), result(2, 0.9)) == TrialScheduler.STOP
    assert restored.on_trial_result(None, FakeTrial("t6"), result(3, 0.9)) == TrialScheduler.STOP
    for trial_id in ("t4", "t6"):
        recorder.on_trial_complete(0, [], FakeTrial(trial_id))
        assert recorder.trials[trial_id]["status"] == "stopped"
    assert restored.on_trial_result(None, FakeTrial("t3"), result(3, 0.7)) == TrialScheduler.CONTINUE


def study_stops(tmp_path) -> set[str]:
    from ray_cifar.tuning.scheduler import recorded_stops

    return recorded_stops(str(tmp_path))


def test_asha_rungs_hold_the_epochs_recovered_at_the_first_step(recorder, tmp_path):
    """A restored trial's milestone epoch, checkpointed but never reported (its report died with the driver), is
    recorded by the recorder at the new driver's first step: after Tune added the restored trials, before its
    first question to the scheduler. ASHA's rungs, rebuilt at that question, hold it with its own score; rebuilt
    when the trials were added, they lacked it, and the trial met that rung on its next epoch's score."""
    asha_args = dict(metric="val_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2)
    _run(RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, **asha_args), HISTORY[:4], recorder)
    restored = pickle.loads(pickle.dumps(RestorableASHA(str(tmp_path), **asha_args)))
    for trial_id in ("t1", "t2", "t3"):
        restored.on_trial_add(None, FakeTrial(trial_id))
    recorder.on_trial_result(0, [], FakeTrial("t3"), result(1, 0.55))  # what the first step recovers

    class Controller:
        def get_trials(self):
            return []

    restored.choose_trial_to_run(Controller())
    rungs = dict(restored.bracket_of("t3")._rungs)
    assert rungs[1] == {"t1": 0.50, "t2": 0.40, "t3": 0.55}
    assert "t3" not in rungs[2]
    restored.on_trial_result(None, FakeTrial("t3"), result(2, 0.65))  # its next epoch: judged at milestone 2
    assert dict(restored.bracket_of("t3")._rungs)[1]["t3"] == 0.55 and rungs[2]["t3"] == 0.65


def test_progress_counts_trials_tune_has_not_created_yet_as_pending():
    """Tune creates trials lazily: 2 of a 6-trial study exist, one done after 2 epochs of 2, one running."""
    from ray_cifar.tuning.recorder import progress_line

    trials = [SimpleNamespace(trial_id="a", status="TERMINATED"), SimpleNamespace(trial_id="b", status="RUNNING")]
    summaries = {"a": {"epochs": 2, "planned_epochs": 2, "status": "completed"},
                 "b": {"epochs": 1, "planned_epochs": 2, "status": "running"}}
    # 3 epochs in 3 minutes: 1 min an epoch. Left: b's last epoch + 4 trials not yet created x 2 epochs.
    line = progress_line(trials, summaries, elapsed=180.0, total_trials=6)
    assert "1 trial(s) done, 1 running, 4 pending" in line and "~9.0 min left at most" in line
    # Without the total, only what Tune has created counts (the old underestimate).
    assert "~1.0 min left at most" in progress_line(trials, summaries, elapsed=180.0)
    # A running trial that has reported no epoch yet has its whole run ahead ("~0.0 min left" was printed so).
    started = trials + [SimpleNamespace(trial_id="c", status="RUNNING")]
    assert "2 running" in progress_line(started, summaries, 180.0) and \
        "~3.0 min left at most" in progress_line(started, summaries, 180.0)
    # ... as long as the longest any trial plans: ASHA stopped the only other at 1 of its 30 epochs ("~1.0 min").
    stopped = {"s": {"epochs": 1, "planned_epochs": 30, "status": "stopped"}}
    assert "~30.0 min left at most" in progress_line(
        [SimpleNamespace(trial_id="s", status="TERMINATED"), SimpleNamespace(trial_id="c", status="RUNNING")],
        stopped, elapsed=60.0)
    # The best so far as the study ranks trials: by each one's best epoch (Tune's table named the best last result).
    summaries["a"].update(trial_id="a", best_metric=0.61, best_epoch=1)
    summaries["b"].update(trial_id="b", best_metric=0.55, best_epoch=1)
    assert progress_line(trials, summaries, 180.0, 6, "val_acc", "max").endswith(
        "; best so far a: val_acc 0.6100 at epoch 1")
    assert progress_line(trials, summaries, 180.0, 6, "val_loss", "min").endswith("; best so far b: val_loss 0.5500 at "
                                                                                 "epoch 1")


def test_brackets_come_from_the_trial_id_so_a_restore_rebuilds_each_trials_own_rungs(recorder, tmp_path):
    asha_args = dict(metric="val_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2, brackets=2)
    original = RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, **asha_args)
    ids = [f"t{i}" for i in range(40)]
    chosen = [original._brackets.index(original.bracket_of(t)) for t in ids]
    assert set(chosen) == {0, 1}  # both brackets get trials ...
    again = RestorableASHA(str(tmp_path), **asha_args)
    assert [again._brackets.index(again.bracket_of(t)) for t in ids] == chosen  # ... the same ones every time
    history = [(t, e, 0.3 + 0.01 * i + 0.05 * e) for i, t in enumerate(ids[:8]) for e in (1, 2)]
    _run(original, history, recorder)
    rebuilt = pickle.loads(pickle.dumps(RestorableASHA(str(tmp_path), **asha_args)))
    restored = _run(rebuilt, [("t30", 1, 0.31), ("t30", 2, 0.36)])  # before the original notes its stop
    assert _run(original, [("t30", 1, 0.31), ("t30", 2, 0.36)]) == restored
    for bracket in original._brackets:  # the rebuilt rungs are the original's, bracket by bracket
        twin = rebuilt._brackets[original._brackets.index(bracket)]
        assert [sorted(r[1].items()) for r in twin._rungs] == [sorted(r[1].items()) for r in bracket._rungs]


def test_asha_on_a_step_budget_decides_at_equal_steps_not_equal_epochs(recorder, tmp_path):
    # Two batch sizes: "small" takes 50 steps an epoch, "large" 25. Rungs at 50, 100, 200 steps (max 400).
    asha = RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, time_attr="steps", metric="val_acc",
                          mode="max", max_t=400, grace_period=50, reduction_factor=2)

    def report(trial_id, epoch, steps, acc):
        return asha.on_trial_result(None, FakeTrial(trial_id), {**result(epoch, acc), "epochs": 16, "steps": steps})

    asha.on_trial_add(None, FakeTrial("small"))
    asha.on_trial_add(None, FakeTrial("large"))
    assert report("small", 1, 50, 0.60) == TrialScheduler.CONTINUE  # first at the 50-step rung
    # After one epoch the large batch has taken 25 steps: below the first rung, nothing is decided ...
    assert report("large", 1, 25, 0.30) == TrialScheduler.CONTINUE
    # ... at 50 steps (epoch 2) it is compared with the small batch at the 50-step rung, and stopped.
    assert report("large", 2, 50, 0.40) == TrialScheduler.STOP
    assert recorder.trials["large"]["status"] == "stopped"
    assert report("small", 8, 400, 0.70) == TrialScheduler.STOP  # the step budget: its end, not a stop
    assert recorder.trials.get("small", {}).get("status") != "stopped"


def test_tune_test_all_evaluates_every_finished_trial_once_at_its_best_epoch(tmp_path, monkeypatch, capsys):
    from ray_cifar.tuning import trial as trial_mod
    from ray_cifar.validation import load_config

    rec = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False)
    for tid, accs in (("a", (0.5, 0.7, 0.6)), ("b", (0.4,)), ("c", (0.3,))):
        for epoch, acc in enumerate(accs, 1):
            rec.on_trial_result(0, [], FakeTrial(tid), {"epoch": epoch, "epochs": 3, "val_acc": acc,
                                                        "checkpoint_path": f"/ckpt/{tid}/{epoch}"})
    rec.note_stopped("b")
    for tid in ("a", "b"):
        rec.on_trial_complete(0, [], FakeTrial(tid))
    rec.on_trial_error(0, [], FakeTrial("c"))  # failed: not a finished trial, no test figure
    evaluated = []
    monkeypatch.setattr(trial_mod, "evaluate_checkpoint", lambda path, split, use_gpu: evaluated.append(path)
                        or {"test_acc": 0.1 * len(evaluated), "test_loss": 1.0})
    assert study.finish_study(load_config(None, ["tune.test=all", "train.use_gpu=false"]), str(tmp_path),
                              ["optim.lr"]) == 1  # c failed
    assert evaluated == ["/ckpt/a/2", "/ckpt/b/1"]  # best first, each at its best epoch, once
    import pyarrow.parquet as pq
    by_id = {t["trial_id"]: t for t in pq.read_table(tmp_path / "trials.parquet").to_pylist()}
    assert by_id["a"]["test_acc"] == pytest.approx(0.1) and by_id["b"]["test_acc"] == pytest.approx(0.2)
    assert by_id["c"]["test_acc"] is None
    assert "never used to choose" in capsys.readouterr().out


class _FakeSearcher:
    def __init__(self):
        self.running, self.paused = set(), set()

    def on_pause(self, trial_id):
        self.paused.add(trial_id)
        self.running.discard(trial_id)

    def on_unpause(self, trial_id):
        self.paused.discard(trial_id)
        self.running.add(trial_id)


class _FakeHyperBandController:
    """What HyperBand asks of Tune's controller after a restore: the trials, stopping one, saving, the searcher."""

    def __init__(self, trials, search_finished: bool = True, searcher=None):
        self.trials, self.stopped, self.saved = trials, [], 0
        self.search_alg = type("SearchAlg", (), {"searcher": searcher or _FakeSearcher(),
                                                 "is_finished": lambda _: search_finished})()

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.set_status(Trial.TERMINATED)

    def checkpoint(self, force=False, wait=False):
        self.saved += 1


def _restored_bohb(tmp_path, rows, statuses, search_finished: bool = True, searcher=None):
    """A BOHB HyperBand (max 3 epochs, reduction 3: a bracket of 3 trials judged at epoch 1, then one of 2) as
    Ray's restore hands it the trials: a fresh copy, the trials newest first, the unfinished ones PENDING
    (one trial a status given)."""
    from ray_cifar.tuning.scheduler import create_scheduler

    ResultsLog(str(tmp_path)).append(rows)
    stops = []
    # tuner.pkl holds the scheduler as the study started it: a fresh one is the same.
    scheduler = create_scheduler("asha", str(tmp_path), stops.append, max_t=3, grace_period=1, reduction_factor=3,
                                 search="bohb")
    scheduler.set_search_properties("val_acc", "max")
    trials = [Trial("__fake", config={}, stub=True, trial_id=f"t{i}", experiment_tag=f"{i + 1}_x")
              for i in range(len(statuses))]
    for t, status in zip(trials, statuses):
        t.set_status(status)
    controller = _FakeHyperBandController(trials, search_finished, searcher)
    for t in reversed(trials):
        scheduler.on_trial_add(controller, t)
    return scheduler, controller, trials, stops


def test_bohbs_largest_bracket_trains_its_best_to_max_epochs(tmp_path):
    """Ray's first milestone, int(max_t / eta^s), rounds down: with the BOHB study's 45 epochs and reduction 3 its
    largest bracket (27 places, so all its 24 trials) had milestones 1, 3, 9, 27 and stopped every trial at 27.
    Rounded up they are 2, 6, 18 and the last is 45. A trial alone in the bracket goes on at each (the best third
    of one) and is stopped at max_t, not before."""
    from ray_cifar.tuning.scheduler import create_scheduler

    scheduler = create_scheduler("asha", str(tmp_path), lambda trial_id: None, max_t=45, grace_period=1,
                                 reduction_factor=3, search="bohb")
    scheduler.set_search_properties("val_acc", "max")
    trial = Trial("__fake", config={}, stub=True, trial_id="t0", experiment_tag="1_x")
    controller = _FakeHyperBandController([trial])
    scheduler.on_trial_add(controller, trial)
    paused_at, epoch, decision = [], 0, None
    while decision != TrialScheduler.STOP and epoch < 100:
        assert scheduler.choose_trial_to_run(controller) in (trial, None)
        trial.set_status(Trial.RUNNING)
        epoch += 1
        decision = scheduler.on_trial_result(controller, trial, {"epoch": epoch, "epochs": 200, "val_acc": 0.5})
        if decision == TrialScheduler.PAUSE:
            paused_at.append(epoch)
            trial.set_status(Trial.PAUSED)
    assert (paused_at, epoch) == ([2, 6, 18], 45)
    # The report says the brackets this scheduler makes: their places and first milestones, for any length.
    from ray_cifar.milestones import hyperband_brackets

    for max_t, factor in ((45, 3), (6, 2), (4, 2), (11, 3), (81, 3)):
        real = create_scheduler("asha", str(tmp_path), lambda trial_id: None, max_t=max_t, grace_period=1,
                                reduction_factor=factor, search="bohb")
        sizes = [(real._get_n0(s), real._get_r0(s)) for s in range(real._s_max_1 - 1, -1, -1)]
        assert sizes == [(places, ms[0]) for places, ms in hyperband_brackets(max_t, factor)]
    assert hyperband_brackets(45, 3)[0] == (27, [2, 6, 18, 45])


def test_bohb_brackets_come_back_and_a_trial_waiting_at_its_milestone_stays_paused(tmp_path):
    rows = [{"trial_id": tid, "epoch": 1, "epochs": 3, "val_acc": acc, "time": n}
            for n, (tid, acc) in enumerate([("t0", 0.5), ("t1", 0.6)])]
    scheduler, controller, trials, stops = _restored_bohb(tmp_path, rows, [Trial.PENDING] * 3)
    assert all(t.status == Trial.PAUSED for t in trials)  # held: Tune starts a PENDING trial without asking
    assert scheduler.choose_trial_to_run(controller) is trials[2]  # the one that has not reached epoch 1
    assert trials[0].status == trials[1].status == Trial.PAUSED  # waiting at the milestone, not run on
    assert controller.search_alg.searcher.paused == {"t0", "t1"}
    bracket = scheduler._trial_info[trials[0]][0]
    assert bracket is scheduler._trial_info[trials[2]][0] and len(bracket._live_trials) == 3  # one bracket, as before
    trials[2].set_status(Trial.RUNNING)
    decision = scheduler.on_trial_result(controller, trials[2], {"epoch": 1, "epochs": 3, "val_acc": 0.7})
    assert decision == TrialScheduler.CONTINUE and sorted(controller.stopped) == ["t0", "t1"] == sorted(stops)


def test_bohb_replays_a_halving_made_before_the_driver_died(tmp_path):
    rows = [{"trial_id": tid, "epoch": e, "epochs": 3, "val_acc": acc, "time": n}
            for n, (tid, e, acc) in enumerate([("t0", 1, 0.5), ("t1", 1, 0.6), ("t2", 1, 0.7), ("t2", 2, 0.72)])]
    scheduler, controller, trials, stops = _restored_bohb(tmp_path, rows, [Trial.TERMINATED, Trial.TERMINATED,
                                                                          Trial.PENDING])
    assert scheduler.choose_trial_to_run(controller) is trials[2]  # promoted at epoch 1, goes on to epoch 3
    bracket = scheduler._trial_info[trials[2]][0]
    assert list(bracket._live_trials) == [trials[2]] and bracket._cumul_r == 3  # the stopped ones are out
    assert controller.stopped == [] and stops == []  # stopped before the kill: nothing to stop again


def test_bohb_waits_for_the_searchers_next_trial_before_judging_a_bracket_that_is_not_full(tmp_path):
    """The driver died after two trials of a three-trial bracket paused at epoch 1, before the searcher made the
    third (its saved state still counts the two as running). Ray judges a bracket whose trials are all paused
    when none runs, full or not: it halved the two (one stopped, one promoted), and the third and fourth went to
    the next bracket, run to epoch 3: 3 trials completed and 1 stopped, in CI. Held until the search is over."""
    rows = [{"trial_id": tid, "epoch": 1, "epochs": 3, "val_acc": acc, "time": n}
            for n, (tid, acc) in enumerate([("t0", 0.5), ("t1", 0.6)])]
    scheduler, controller, trials, stops = _restored_bohb(tmp_path, rows, [Trial.PENDING] * 2, search_finished=False)
    searcher = controller.search_alg.searcher
    searcher.running = {"t0", "t1", "lost"}  # as saved before the pauses, and a trial Tune never saved
    assert scheduler.choose_trial_to_run(controller) is None  # nothing to run until the searcher's next trial
    assert controller.stopped == [] and [t.status for t in trials] == [Trial.PAUSED] * 2
    assert searcher.running == set()  # so that the searcher suggests the third (it stops at max_concurrent)
    third = Trial("__fake", config={}, stub=True, trial_id="t2", experiment_tag="3_x")
    controller.trials.append(third)
    scheduler.on_trial_add(controller, third)
    assert scheduler.choose_trial_to_run(controller) is third
    bracket = scheduler._trial_info[third][0]
    assert bracket is scheduler._trial_info[trials[0]][0] and len(bracket._live_trials) == 3
    third.set_status(Trial.RUNNING)
    assert scheduler.on_trial_result(controller, third, {"epoch": 1, "epochs": 3, "val_acc": 0.4}) == \
        TrialScheduler.STOP  # the worst of three
    assert controller.stopped == ["t0"] and sorted(stops) == ["t0", "t2"]


def test_bohb_judges_a_bracket_that_is_not_full_once_the_search_has_made_all_its_trials(tmp_path):
    """The other side of the wait above: with no trial to come and none running, the bracket's paused trials are
    judged as they are (else the study would wait for ever)."""
    rows = [{"trial_id": tid, "epoch": 1, "epochs": 3, "val_acc": acc, "time": n}
            for n, (tid, acc) in enumerate([("t0", 0.5), ("t1", 0.6)])]
    scheduler, controller, trials, stops = _restored_bohb(tmp_path, rows, [Trial.PENDING] * 2, search_finished=True)
    assert scheduler.choose_trial_to_run(controller) is trials[1]  # the better one goes on
    assert controller.stopped == ["t0"] == stops


def test_bohb_gives_its_model_a_milestone_result_the_dead_driver_had_not_saved(tmp_path):
    """t1 wrote its epoch-1 row and the driver died before it saw the result: the saved TuneBOHB knows t0's
    observation only (in the suite once: one epoch-1 loss in the model at the end). The rebuild hands it t1's,
    once; t0's is not counted twice, and the searcher's running set stays the rebuild's own."""
    pytest.importorskip("hpbandster")
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.bohb import TuneBOHB

    space = TuneBOHB.convert_search_space({"optim.lr": tune.loguniform(1e-6, 0.2)})
    searcher = TuneBOHB(space=space, metric="val_acc", mode="max", seed=0)
    for tid in ("t0", "t1", "t2"):
        searcher.suggest(tid)
    searcher.on_trial_result("t0", {"val_acc": 0.5, "hyperband_info": {"budget": 1}})
    searcher.on_pause("t0")
    rows = [{"trial_id": tid, "epoch": 1, "epochs": 3, "val_acc": acc, "time": n}
            for n, (tid, acc) in enumerate([("t0", 0.5), ("t1", 0.6)])]
    # Inside Tune's ConcurrencyLimiter, as a study with tune.max_concurrent_trials hands it to the scheduler
    # (the replay once took the limiter for the searcher, and did nothing).
    limited = ConcurrencyLimiter(searcher, max_concurrent=2)
    scheduler, controller, trials, _ = _restored_bohb(tmp_path, rows, [Trial.PENDING] * 3, searcher=limited)
    assert scheduler.choose_trial_to_run(controller) is trials[2]
    assert sorted(searcher.bohber.losses[1]) == [-0.6, -0.5] and len(searcher.bohber.configs[1]) == 2
    assert searcher.paused == {"t0", "t1"} and searcher.running == {"t2"}


def test_bohb_judges_a_trial_whose_milestone_report_died_with_the_driver_by_its_checkpoint(tmp_path, capsys):
    """The driver died after t2 checkpointed epoch 1 but before its report: no row. Read from the checkpoint
    before HyperBand rebuilds, t2 is at its milestone with the others and judged on its epoch 1; without it, t2
    resumed, trained epoch 2 and was judged on that against the others' epoch 1 (stopped at epoch 2, in CI)."""
    from ray_cifar import checkpoint
    from ray_cifar.checkpoint_store import CheckpointStore

    storage_path = tmp_path / "ray"
    rows = [{"trial_id": tid, "epoch": 1, "epochs": 3, "val_acc": acc, "time": n}
            for n, (tid, acc) in enumerate([("t0", 0.5), ("t1", 0.6)])]
    checkpoint.save_state({"epoch": 1, "history": [{"epoch": 1, "epochs": 3, "val_acc": 0.55}]}, str(tmp_path / "s"))
    CheckpointStore(str(storage_path / "trial-t2")).save(str(tmp_path / "s"), 1, best_epoch=1)
    output = tmp_path / "study"
    scheduler, controller, trials, stops = _restored_bohb(output, rows, [Trial.PENDING] * 3)
    restored = StudyRecorder(str(output), no_params, "val_acc", "max", tensorboard=False,
                             storage_path=str(storage_path))
    restored = pickle.loads(pickle.dumps(restored))  # as tuner.pkl brings it back
    for step in range(2):  # Tune's step: callbacks first, then the scheduler picks what runs
        restored.on_step_begin(step, trials)
    assert capsys.readouterr().out.count("trial t2: epoch(s) up to 1 checkpointed but unrecorded") == 1
    assert sorted((r["trial_id"], r["epoch"]) for r in ResultsLog(str(output)).read()) == [("t0", 1), ("t1", 1),
                                                                                          ("t2", 1)]
    assert restored.trials["t2"]["latest_checkpoint"].endswith("trial-t2/checkpoint_000001")
    assert scheduler.choose_trial_to_run(controller) is trials[1]  # the best at epoch 1 goes on
    assert sorted(controller.stopped) == ["t0", "t2"] == sorted(stops)  # at their milestone: none trained past it


def test_a_stopped_study_closes_its_tensorboard_files(tmp_path):
    """Trials stopped unfinished (Ctrl-C, SIGTERM, a full disk) never reach on_trial_complete: their event files
    are closed at the experiment's end, not by tensorboardX's exit hook (whose failed flush on a full disk is a
    traceback at exit)."""
    rec = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max")
    rec.on_trial_result(0, [], FakeTrial("t"), result(1, 0.5))
    writer = rec.writers["t"]
    rec.on_experiment_end([])
    assert rec.writers == {} and writer.all_writers is None  # closed


def test_bohb_does_not_call_stopped_a_trial_whose_last_epochs_the_dead_driver_never_saw(tmp_path):
    """t3, alone in the second bracket, trained to its last epoch and checkpointed while the driver died before it
    saw the results (rows recovered from the checkpoint, Tune's last result still epoch 1). The replay ends it at
    the bracket's last milestone: it finished, not stopped (in CI it was recorded `stopped` at epoch 3)."""
    rows = [{"trial_id": tid, "epoch": e, "epochs": 3, "val_acc": acc, "time": n}
            for n, (tid, e, acc) in enumerate([("t0", 1, 0.5), ("t1", 1, 0.6), ("t2", 1, 0.7), ("t3", 1, 0.4),
                                               ("t3", 2, 0.45), ("t3", 3, 0.5)])]
    scheduler, controller, trials, stops = _restored_bohb(tmp_path, rows, [Trial.TERMINATED, Trial.TERMINATED,
                                                                          Trial.TERMINATED, Trial.PENDING])
    trials[3].run_metadata.last_result = {"epoch": 1, "epochs": 3, "val_acc": 0.4}
    scheduler.choose_trial_to_run(controller)
    assert "t3" not in stops


def test_a_trial_tunes_state_never_held_is_lost_not_running_for_ever(tmp_path, capsys):
    """A driver killed after a trial was made and before Tune saved its trial list: Tune's restored study never
    runs that trial again (a model-based searcher draws another in its place). At the experiment's end its summary
    says `lost`, not `running`; a trial Tune still holds stays `running`; a lost trial made again (a grid study's:
    same id) runs on."""
    first = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False)
    for tid in ("t0", "t1", "t2"):
        first.on_trial_result(0, [], FakeTrial(tid), result(1, 0.5, epochs=2 if tid == "t1" else 1))
    # The resumed driver's Tune knows t0 (finished) and t2 (pending, e.g. the study stopped again), not t1.
    resumed = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False)
    resumed.on_trial_complete(0, [], FakeTrial("t0"))
    known = [SimpleNamespace(trial_id="t0", status="TERMINATED"), SimpleNamespace(trial_id="t2", status="PENDING")]
    resumed.on_experiment_end(known)
    on_disk = json.loads((tmp_path / "trials.json").read_text())
    assert {tid: t["status"] for tid, t in on_disk.items()} == {"t0": "completed", "t1": "lost", "t2": "running"}
    assert "Tune never ran it again" in on_disk["t1"]["error"] and on_disk["t1"]["epochs"] == 1
    assert capsys.readouterr().out.count("trial t1 (1 epoch(s) recorded): lost with a dead driver") == 1
    again = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False)
    again.on_trial_result(0, [], FakeTrial("t1"), result(2, 0.6, epochs=2))
    assert (again.trials["t1"]["status"], again.trials["t1"]["error"]) == ("running", None)
    again.on_trial_complete(0, [], FakeTrial("t1"))
    assert again.trials["t1"]["status"] == "completed"


def test_a_trial_the_studys_stop_cut_short_stays_running_and_one_that_ended_is_completed(tmp_path):
    """At a Ctrl-C, SIGTERM or full disk Tune ends every running trial TERMINATED, as it ends one that finished; only
    the last result of one that ended (returned, or stopped by its scheduler) is marked done. The experiment's end
    made every `running` summary with a TERMINATED trial `completed`: a trial cut short at epoch 1 of 4 was recorded
    completed, and stayed so after the resume (ASHA's stop changes only a `running` trial). A summary rebuilt from
    rows (trials.json damaged) still learns that its trial ended, and how."""
    rec = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False)
    for tid in ("cut", "ended", "errored"):
        rec.on_trial_result(0, [], FakeTrial(tid), result(4 if tid == "ended" else 1, 0.5))
    rec.on_experiment_end([SimpleNamespace(trial_id="cut", status="TERMINATED", last_result=result(1, 0.5, done=False)),
                           SimpleNamespace(trial_id="ended", status="TERMINATED", last_result=result(4, 0.5, done=True)),
                           SimpleNamespace(trial_id="errored", status="ERROR", last_result=result(1, 0.5))])
    on_disk = json.loads((tmp_path / "trials.json").read_text())
    assert {tid: t["status"] for tid, t in on_disk.items()} == {"cut": "running", "ended": "completed",
                                                               "errored": "failed"}
    resumed = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False)
    resumed.on_trial_result(0, [], FakeTrial("cut"), result(2, 0.4))
    resumed.note_stopped("cut")  # ASHA, at its rung on the resumed run
    assert resumed.trials["cut"]["status"] == "stopped"


def test_trials_stopped_before_a_restore_are_stopped_before_they_train_again(recorder, tmp_path):
    """A trial ASHA had stopped (recorded `stopped`), or that the rebuilt rungs stop at a recovered row, came back
    unfinished from the restore and was stopped at its next result: it trained one epoch past its stop, and that
    epoch's row counted in its best (seen in a kill audit: a trial moved up the ranking). Now Tune's first question
    stops them while they wait, and says so to Tune's state."""
    asha_args = dict(metric="val_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2)
    original = RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, **asha_args)
    assert _run(original, HISTORY + NEXT, recorder)["t4"] == TrialScheduler.STOP  # recorded stopped; Tune never ended it
    recorder.on_trial_result(None, [], FakeTrial("t6"), result(1, 0.3))  # recovered: the rebuilt rung 1 stops it
    recorder, restored = pickle.loads(pickle.dumps(
        (recorder, RestorableASHA(str(tmp_path), on_stop=recorder.note_stopped, **asha_args))))
    trials = {tid: SimpleNamespace(trial_id=tid, status="PENDING", config={}, last_result={})
              for tid in ("t3", "t4", "t6")}
    for t in trials.values():
        restored.on_trial_add(None, t)

    told = []

    class Controller:
        stopped: list[str] = []
        search_alg = SimpleNamespace(on_trial_complete=lambda tid, result: told.append((tid, result["val_acc"])))

        def get_trials(self):
            return list(trials.values())

        def stop_trial(self, trial):
            self.stopped.append(trial.trial_id)
            trial.status = "TERMINATED"

    controller = Controller()
    chosen = restored.choose_trial_to_run(controller)
    assert controller.stopped == ["t4", "t6"] and chosen is trials["t3"]
    # The search algorithm told each one's last result first: Tune's stop of a waiting trial tells it none (Optuna
    # took that for PRUNED: seen in CI).
    assert told == [("t4", 0.50), ("t6", 0.3)]
    assert recorder.trials["t6"]["status"] == "stopped" and recorder.trials["t4"]["status"] == "stopped"
    restored.choose_trial_to_run(controller)
    assert controller.stopped == ["t4", "t6"]  # once


def test_tunes_own_resume_hint_is_not_shown_beside_the_studys(caplog):
    """At an interrupted study Tune logs "Resume experiment with: Tuner.restore(path=..., trainable=...)" beside the
    study's own `python -m ray_cifar.tune --resume OUTPUT` line: a second way to resume, without ray_cifar's parts."""
    import logging

    from ray_cifar.tuning.recorder import NoTunerRestoreHint

    tune_logger = logging.getLogger("ray.tune.tune")
    NoTunerRestoreHint.install()
    NoTunerRestoreHint.install()  # once only
    try:
        with caplog.at_level(logging.WARNING):
            tune_logger.warning("Experiment has been interrupted, but the most recent state was saved.\n"
                                "Resume experiment with: Tuner.restore(path=\"/x\", trainable=...)")
            tune_logger.warning("Total run time: 3.00 seconds")
        assert [r.getMessage() for r in caplog.records] == ["Total run time: 3.00 seconds"]
        assert sum(isinstance(f, NoTunerRestoreHint) for f in tune_logger.filters) == 1
    finally:
        for f in [f for f in tune_logger.filters if isinstance(f, NoTunerRestoreHint)]:
            tune_logger.removeFilter(f)


def test_asha_tops_out_at_the_longest_trial_a_study_searches():
    """ASHA's top rung was the fixed train.epochs: a trial that searched 4 epochs was cut at the study's 2 and read
    `completed`, and the banner said "max 2 epochs"."""
    from ray_cifar.tuning import cluster
    from ray_cifar.validation import load_config

    cfg = load_config(None, ["train.epochs=2", "tune.scheduler=asha", "train.num_workers=1",
                             "tune.search_space={train.epochs: {grid: [2, 4]}}"])
    assert cluster.max_trial_epochs(cfg) == 4 and "max 4 epochs" in study._banner(cfg, "OUT", 1, False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = load_config(os.path.join(root, "studies", "resnet18_lr_schedule_wd.yaml"), ["train.epochs=10"])
    assert cluster.max_trial_epochs(rows) == 15  # its 15-epoch rows, beside the --set 10 of the others
    assert cluster.max_trial_epochs(load_config(None, ["tune.search_space={}"])) == 30


def test_a_tracked_trials_first_rows_are_its_recorded_rows_read_only_when_there_are_earlier_ones(tmp_path,
                                                                                               monkeypatch):
    """The tracker gets a trial's every recorded row at its first row in a driver's life. The rows were read back
    for each new trial too, whose only rows are those just recorded: 0.4 s a trial at 30,000 rows; and once a trial
    at a resumed study's end (20 min for 3,000 trials)."""
    class Tracker:
        def __init__(self):
            self.logged, self.ended = {}, []

        def log_epochs(self, trial_id, params, rows):
            self.logged.setdefault(trial_id, []).extend(r["epoch"] for r in rows)

        def end_trial(self, trial_id, params, status):
            self.ended.append(trial_id)

    def recorder_with(tracker):
        rec = StudyRecorder(str(tmp_path), lr_params, "val_acc", "max", tensorboard=False,
                            tracking={"tracking": "fake"})
        rec.tracker = tracker
        reads = []
        read = rec.log.read
        monkeypatch.setattr(rec.log, "read", lambda *a, **k: reads.append(1) or read(*a, **k))
        return rec, reads

    first, reads = recorder_with(Tracker())
    for epoch in (1, 2):
        first.on_trial_result(0, [], FakeTrial("old"), result(epoch, 0.3))
    first.on_trial_complete(0, [], FakeTrial("old"))
    first.on_trial_result(0, [], FakeTrial("cut"), result(1, 0.3))
    assert first.tracker.logged == {"old": [1, 2], "cut": [1]} and reads == []
    # A new driver (as after --resume): a trial with rows before it reads them back once; a new one does not.
    again, reads = recorder_with(Tracker())
    again.on_trial_result(0, [], FakeTrial("cut"), result(2, 0.4))
    assert again.tracker.logged == {"cut": [1, 2]} and len(reads) == 1
    again.on_trial_result(0, [], FakeTrial("new"), result(1, 0.5))
    assert again.tracker.logged["new"] == [1] and len(reads) == 1
    # Its end: the trials that finished before it get their rows and their end, from one read.
    done = SimpleNamespace(trial_id="old", config={"optim.lr": 0.1}, status="TERMINATED")
    again._catch_up_tracker([done])
    assert again.tracker.logged["old"] == [1, 2] and again.tracker.ended == ["old"] and len(reads) == 2
