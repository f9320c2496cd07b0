"""Every file ray_cifar reads back, damaged three ways (truncated, zero-length, random bytes): the outcome each
one has by design. Unit-sized (no Ray started); the real-run cases are in test_stops.py."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import yaml

from conftest import resolved_config
from ray_cifar import checkpoint, cli, report, storage
from ray_cifar.config import ConfigError
from ray_cifar.tuning import study, tune_state
from ray_cifar.tuning.tune_state import TuneStateBackup
from ray_cifar.checkpoint_store import CheckpointStore, newest_loadable_state
from ray_cifar.data.source import load_cifar10
from ray_cifar.results import FINISHED, DamagedFile, ResultsLog, read_rows, write_rows

DAMAGE = ["truncated", "zero-length", "random bytes"]


def damage(path, how: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if how == "truncated":
            f.truncate(size // 2)
        elif how == "zero-length":
            f.truncate(0)
        else:
            f.write(os.urandom(size))  # the same length, other bytes


def state(epoch: int) -> dict:
    return {"epoch": epoch, "weights": torch.full((64,), float(epoch)), "history": [{"epoch": e} for e in range(1, epoch + 1)]}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_told_from_a_format_change(tmp_path, how):
    checkpoint.save_state(state(1), str(tmp_path / "a"))
    assert checkpoint.load_state(str(tmp_path / "a"))["epoch"] == 1
    damage(tmp_path / "a" / checkpoint.STATE_FILE, how)
    with pytest.raises(checkpoint.CheckpointDamaged, match="damaged"):
        checkpoint.load_state(str(tmp_path / "a"))
    # Intact bytes (the checksum matches) that torch cannot load: another version's format, not damage.
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / checkpoint.STATE_FILE).write_bytes(b"not a torch file")
    (tmp_path / "b" / checkpoint.CHECKSUM_FILE).write_text(storage.file_sha256(tmp_path / "b" / checkpoint.STATE_FILE))
    with pytest.raises(checkpoint.CheckpointFormatError, match="intact but not loadable"):
        checkpoint.load_state(str(tmp_path / "b"))


@pytest.mark.parametrize("how", DAMAGE)
def test_checkpoint_store_falls_back_to_the_newest_that_loads(tmp_path, how):
    store = CheckpointStore(str(tmp_path / "trial-x"))
    for epoch in (1, 2, 3, 4):
        checkpoint.save_state(state(epoch), str(tmp_path / "tmp"))
        store.save(str(tmp_path / "tmp"), epoch, best_epoch=1)
    # The latest, the one before it (so a damaged latest leaves a state) and the best.
    assert sorted(os.listdir(tmp_path / "trial-x")) == ["checkpoint_000001", "checkpoint_000003", "checkpoint_000004"]
    damage(tmp_path / "trial-x" / "checkpoint_000004" / checkpoint.STATE_FILE, how)
    warnings = []
    assert store.latest(warnings.append)["epoch"] == 3
    assert len(warnings) == 1 and "checkpoint_000004" in warnings[0] and "epoch 3" in warnings[0], warnings
    damage(tmp_path / "trial-x" / "checkpoint_000003" / checkpoint.STATE_FILE, how)
    damage(tmp_path / "trial-x" / "checkpoint_000001" / checkpoint.STATE_FILE, how)
    warnings.clear()
    assert store.latest(warnings.append) is None  # none loads: the trial starts over, said in one line
    assert len(warnings) == 1 and "starting over" in warnings[0] and "2 older one(s)" in warnings[0], warnings


def test_ray_train_checkpoint_folders_fall_back_too(tmp_path):
    """A DDP trial's folders are Ray Train's checkpoint_<time>; newest_loadable_state orders them by name (time)."""
    run = tmp_path / "trial-y"
    for epoch, stamp in ((1, "2026-12-01_01-00-00.000001"), (2, "2026-12-01_01-00-09.000002")):
        checkpoint.save_state(state(epoch), str(run / f"checkpoint_{stamp}"))
    damage(run / "checkpoint_2026-12-01_01-00-09.000002" / checkpoint.STATE_FILE, "truncated")
    where, loaded = newest_loadable_state(str(run), warn=lambda m: None)
    assert loaded["epoch"] == 1 and where.endswith("checkpoint_2026-12-01_01-00-00.000001")


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_ray_train_run_list_is_set_aside_and_the_trial_goes_on_from_its_newest_loadable(tmp_path, how):
    """Ray Train rewrites a run's checkpoint_manager_snapshot.json in place; a kill mid-write left it empty (seen in
    CI) and the resumed run's controller failed the trial for good on it. It is set aside with one line, and the
    ranks then look for the newest checkpoint of the run's folder that loads (test_fault_tolerance's long test runs
    this through a killed driver and Ray Train)."""
    from ray_cifar.tuning.trial import RUN_SNAPSHOT, set_aside_damaged_run_snapshot

    run = tmp_path / "trial-y"
    warnings: list[str] = []
    assert not set_aside_damaged_run_snapshot(str(run), warnings.append)  # the run's first start: none yet
    for epoch, stamp in ((1, "2026-12-01_01-00-00.000001"), (2, "2026-12-01_01-00-09.000002")):
        checkpoint.save_state(state(epoch), str(run / f"checkpoint_{stamp}"))
    snapshot = run / RUN_SNAPSHOT
    snapshot.write_text(json.dumps({"checkpoint_results": [{"checkpoint": "checkpoint_2026-12-01_01-00-09.000002",
                                                            "metrics": {"epoch": 2, "val_acc": 0.5}}]}))
    assert not set_aside_damaged_run_snapshot(str(run), warnings.append) and snapshot.exists() and not warnings
    damage(snapshot, how)
    assert set_aside_damaged_run_snapshot(str(run), warnings.append)
    assert not snapshot.exists() and (run / f"{RUN_SNAPSHOT}.damaged").exists()
    assert len(warnings) == 1 and f"({RUN_SNAPSHOT}) was damaged" in warnings[0], warnings
    where, loaded = newest_loadable_state(str(run), warn=warnings.append)
    assert loaded["epoch"] == 2 and where.endswith("checkpoint_2026-12-01_01-00-09.000002") and len(warnings) == 1


def test_a_failed_save_leaves_the_previous_state(tmp_path, monkeypatch):
    checkpoint.save_state(state(1), str(tmp_path))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("file write failed")))
    with pytest.raises(OSError):
        checkpoint.save_state(state(2), str(tmp_path))
    assert checkpoint.load_state(str(tmp_path))["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == [checkpoint.STATE_FILE, checkpoint.CHECKSUM_FILE]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_results_part_is_one_line_or_set_aside(tmp_path, how):
    log = ResultsLog(str(tmp_path))
    log.append([{"trial_id": "a", "epoch": 1, "val_acc": 0.1}])
    damaged = log.append([{"trial_id": "a", "epoch": 2, "val_acc": 0.2}])
    damage(damaged, how)
    with pytest.raises(DamagedFile, match="part-000001.parquet is damaged"):
        ResultsLog(str(tmp_path)).read()
    warnings = []
    tolerant = ResultsLog(str(tmp_path), set_aside_damaged=True, warn=warnings.append)
    assert [r["epoch"] for r in tolerant.read()] == [1]
    assert tolerant.damaged == [damaged] and os.path.exists(damaged + ".damaged") and len(warnings) == 1
    tolerant.compact()  # the set-aside part is out of every later read
    assert [r["epoch"] for r in ResultsLog(str(tmp_path)).read()] == [1]


@pytest.mark.parametrize("how", DAMAGE)
def test_report_of_a_damaged_results_file_is_one_line_exit_2(tmp_path, capsys, how):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(resolved_config({"tune": {"metric": "val_acc"}})))
    write_rows([{"trial_id": "a", "epoch": 1, "val_acc": 0.5}], str(tmp_path / "results.parquet"))
    damage(tmp_path / "results.parquet", how)
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.parquet is damaged" in err[0], err


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_config_yaml_under_resume_is_one_line_exit_2(tmp_path, capsys, how):
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 3\n" + "# padding\n" * 20)
    damage(tmp_path / "config.yaml", how)
    if how == "truncated":
        (tmp_path / "config.yaml").write_text("train: {epochs: [3\n  lr: 0.1")  # cut inside a flow mapping
    with pytest.raises(SystemExit) as stop:
        cli.load_resolved_config(str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "config.yaml" in err[0], err


@pytest.mark.parametrize("how", DAMAGE)
def test_the_decode_cache_and_its_checksum_are_rebuilt(tmp_path, synthetic_parquet_dir, how):
    cache = str(tmp_path / "cache")
    first = load_cifar10(synthetic_parquet_dir, cache, log=lambda m: None)
    for name in os.listdir(cache):
        if name.endswith((".txt", ".npz")):
            damage(os.path.join(cache, name), how)
    lines = []
    again = load_cifar10(synthetic_parquet_dir, cache, log=lines.append)
    assert again.checksum == first.checksum and (again.train_labels == first.train_labels).all()
    assert any("checksum" in line and "damaged" in line for line in lines), lines
    if how != "zero-length":  # a zero-length npz is no cache at all
        assert any("cache" in line and "is damaged" in line for line in lines), lines
    lines.clear()
    load_cifar10(synthetic_parquet_dir, cache, log=lines.append)
    assert any("using cache" in line for line in lines) and not any("damaged" in line for line in lines), lines


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_trials_json_is_rebuilt_from_the_rows(tmp_path, how):
    from ray_cifar.tuning.recorder import StudyRecorder

    ResultsLog(str(tmp_path)).append([{"trial_id": "a", "epoch": e, "val_acc": e / 10, "optim.lr": 0.1,
                                       "checkpoint_path": f"/x/checkpoint_00000{e}"} for e in (1, 2)])
    (tmp_path / "trials.json").write_text(json.dumps({"a": {"trial_id": "a", "status": "completed", "pad": "x" * 50}}))
    damage(tmp_path / "trials.json", how)
    recorder = StudyRecorder(str(tmp_path), lambda config: {}, "val_acc", "max", tensorboard=False)
    recorder.setup()  # as Tune does after unpickling it: the rebuilt list was gone here (nothing was saved)
    trial = recorder.trials["a"]
    assert trial["epochs"] == 2 and trial["best_epoch"] == 2 and trial["optim.lr"] == 0.1
    assert trial["latest_checkpoint"] == "/x/checkpoint_000002" and (tmp_path / "trials.json.damaged").exists()


class EndedTrial:
    def __init__(self, trial_id, status, last_result):
        self.trial_id, self.status, self.last_result, self.config = trial_id, status, last_result, {}


def test_a_missing_trials_json_is_rebuilt_and_each_trial_ends_as_tune_ended_it(tmp_path, capsys):
    """A killed study whose trials.json was lost (or damaged) went on with only the trials still running: the
    rebuilt list was never saved, and Tune's setup read the folder again. And a trial its scheduler had stopped
    short of its epochs ended `completed`."""
    from ray_cifar.tuning.recorder import StudyRecorder

    ResultsLog(str(tmp_path)).append([{"trial_id": tid, "epoch": e, "val_acc": e / 10} for tid, epochs in
                                      (("full", 4), ("cut", 1), ("cut_by_stop", 2)) for e in range(1, epochs + 1)])
    recorder = StudyRecorder(str(tmp_path), lambda config: {}, "val_acc", "max", tensorboard=False)
    assert "trials.json is missing; rebuilt from the results rows" in capsys.readouterr().out
    recorder.setup()
    assert sorted(recorder.trials) == ["cut", "cut_by_stop", "full"]
    recorder.on_experiment_end([EndedTrial("full", "TERMINATED", {"epoch": 4, "epochs": 4, "done": True}),
                                EndedTrial("cut", "TERMINATED", {"epoch": 1, "epochs": 4, "done": True}),
                                EndedTrial("cut_by_stop", "TERMINATED", {"epoch": 2, "epochs": 4})])  # a Ctrl-C
    saved = json.loads((tmp_path / "trials.json").read_text())
    assert {tid: t["status"] for tid, t in saved.items()} == {"full": "completed", "cut": "stopped",
                                                             "cut_by_stop": "running"}
    # A new study's folder has no rows and no trials.json: nothing to rebuild, nothing said.
    StudyRecorder(str(tmp_path / "new"), lambda config: {}, "val_acc", "max", tensorboard=False)
    assert "missing" not in capsys.readouterr().out


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_driver_lock_names_no_driver(tmp_path, how):
    (tmp_path / study.DRIVER_LOCK).write_text(json.dumps({"pid": 1, "host": "h", "pad": "x" * 20}))
    damage(tmp_path / study.DRIVER_LOCK, how)
    study.hold_driver_lock(str(tmp_path))
    assert json.loads((tmp_path / study.DRIVER_LOCK).read_text())["pid"] == os.getpid()


def test_a_damaged_tune_experiment_state_comes_back_from_its_copy(tmp_path, capsys):
    experiment = tmp_path / "ray" / "tune"
    experiment.mkdir(parents=True)
    (experiment / "experiment_state-1.json").write_text(json.dumps({"trials": [1]}))
    (experiment / "experiment_state-2.json").write_text(json.dumps({"trials": [1, 2]}))
    backup = TuneStateBackup(str(tmp_path), str(experiment), every_seconds=0)
    backup.save()
    damage(experiment / "experiment_state-2.json", "truncated")
    backup.restore()
    assert json.loads((experiment / "experiment_state-2.json").read_text()) == {"trials": [1, 2]}
    assert "restored from" in capsys.readouterr().out
    # No whole copy of the newest: set aside, Tune resumes from the one before it.
    damage(experiment / "experiment_state-2.json", "random bytes")
    os.remove(tmp_path / tune_state.BACKUP / "experiment_state-2.json")
    backup.restore()
    assert sorted(os.listdir(experiment)) == ["experiment_state-1.json", "experiment_state-2.json.damaged"]
    damage(experiment / "experiment_state-1.json", "zero-length")
    os.remove(tmp_path / tune_state.BACKUP / "experiment_state-1.json")
    for _ in range(2):  # the same line on every --resume: the last one stays where it is
        with pytest.raises(cli.ConfigError, match="no experiment_state") as refused:
            backup.restore()
    # With the ways on: the report of what was recorded, and the study trained again (it gave none).
    assert (f"python -m ray_cifar.report {tmp_path} reports it; to train the study again: python -m ray_cifar.tune "
            f"--config {tmp_path}/config.yaml --output NEW") in str(refused.value)
    assert (experiment / "experiment_state-1.json").exists()


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", [tune_state.TUNER, "basic-variant-state-2026-12-02_10-00-00.json",
                                  "searcher-state-2026-12-02_10-00-00.pkl"])
def test_tunes_pickled_state_comes_back_from_its_copy(tmp_path, capsys, name, how):
    """A resumed study's Tune copies tuner.pkl back into ray/tune at every snapshot: a full disk left it empty and
    Tuner.restore failed with "EOFError: Ran out of input" (seen in CI). The searchers' states are pickles too."""
    experiment = tmp_path / "ray" / "tune"
    experiment.mkdir(parents=True)
    state = {"name": name, "space": {"optim.lr": [0.05, 0.1]}, "pad": list(range(200))}
    (experiment / name).write_bytes(pickle.dumps(state, protocol=5))
    backup = TuneStateBackup(str(tmp_path), str(experiment), every_seconds=0)
    backup.save()
    damage(experiment / name, how)
    assert not tune_state.is_whole(str(experiment / name), "pickle")
    backup.restore()
    assert pickle.loads((experiment / name).read_bytes()) == state
    assert "restored from" in capsys.readouterr().out
    # Without a whole copy: one line naming the kind, on every --resume.
    damage(experiment / name, how)
    os.remove(tmp_path / tune_state.BACKUP / name)
    for _ in range(2):
        with pytest.raises(cli.ConfigError, match="no .* loads"):
            backup.restore()


def test_a_state_file_gone_since_the_listing_does_not_stop_the_copies(tmp_path, monkeypatch):
    """Tune rewrites its folder while the copies are taken: a file listed but gone is skipped, the rest copied."""
    experiment = tmp_path / "ray" / "tune"
    experiment.mkdir(parents=True)
    (experiment / "experiment_state-1.json").write_text(json.dumps({"trials": [1]}))
    (experiment / tune_state.TUNER).write_bytes(pickle.dumps({"tuner": 1}))
    stamp = storage.stamp

    def gone(path):
        if path.endswith(".json"):
            raise FileNotFoundError(path)
        return stamp(path)

    monkeypatch.setattr(storage, "stamp", gone)
    TuneStateBackup(str(tmp_path), str(experiment), every_seconds=0).save()
    assert sorted(os.listdir(tmp_path / tune_state.BACKUP)) == [tune_state.TUNER]


def test_output_that_cannot_be_created_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    for output in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(SystemExit) as stop:
            cli.create_output(str(output))
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and "a file is in the way" in err[0], err


def test_output_on_a_read_only_file_system_is_one_line_exit_2(tmp_path, capsys):
    """Root ignores permission bits: "read-only" is a read-only mount here."""
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        with pytest.raises(SystemExit) as stop:
            cli.create_output(str(mount / "study"))
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and "read-only file system" in err[0], err
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_set_of_a_searched_field_says_the_search_overrides_it(capsys):
    from ray_cifar.validation import load_config

    sets = ["train.global_batch_size=100000", "train.epochs=3",
            "tune.search_space={train.global_batch_size: {grid: [128, 256]}}"]
    cli.warn_sets_searched(load_config(None, sets), sets)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "--set train.global_batch_size=100000 has no effect" in out[0], out
    assert "tune.search_space overrides it" in out[0] and "change the search instead" in out[0]


def test_set_of_a_field_only_some_variants_search_says_it_reaches_the_others(capsys):
    # As in studies/resnet18_lr_schedule_wd.yaml: some variants set their own epochs, the others take the config's
    # (a --set's included); every variant sets its lr. And a grid over a section: every value sets optim.name,
    # one sets optim.momentum.
    from ray_cifar.validation import load_config

    space = ("tune.search_space={variants: {grid: [{optim.lr: 0.1, train.epochs: 15}, {optim.lr: 0.01, "
             "train.epochs: 15}, {optim.lr: 0.001}]}, optim: {grid: [{name: sgd, momentum: 0.8}, {name: adam}]}}")
    sets = ["train.epochs=20", "optim.lr=0.05", "optim.momentum=0.5", "optim.name=sgd", space]
    cli.warn_sets_searched(load_config(None, sets), sets)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4, out
    assert "--set train.epochs=20 reaches only some trials: 2 of the 3 values the study searches set train.epochs " \
           "themselves" in out[0], out[0]
    assert "--set optim.lr=0.05 has no effect: the study searches optim.lr" in out[1], out[1]
    assert "--set optim.momentum=0.5 reaches only some trials: 1 of the 2 values" in out[2], out[2]
    assert "--set optim.name=sgd has no effect: the study searches optim.name" in out[3], out[3]


def test_a_study_resumes_only_where_it_started_and_with_the_config_it_started_with(tmp_path, capsys):
    """A copied or moved study folder, resumed, trained on into the old path (Tune's state, the recorder and the
    checkpoint paths name it) and marked the new folder finished with its trials unfinished; an edited config.yaml
    was taken for the study's own while its trials and recorder followed the first (val_loss ranked by val_acc)."""
    from ray_cifar.validation import load_config

    cfg = load_config(None, ["train.epochs=4"])
    first = tmp_path / "first"
    first.mkdir()
    study.check_start(cfg, str(first), None)  # the first driver: writes where and with what
    start = json.loads((first / study.STUDY_START).read_text())
    assert start["location"] == os.path.realpath(first) and start["config"]["train.epochs"] == 4
    study.check_start(cfg, str(first), None)  # resumed in place, same config: fine
    os.symlink(first, tmp_path / "link")
    study.check_start(cfg, str(tmp_path / "link"), None)  # the same folder by another name: fine

    edited = load_config(None, ["train.epochs=5", "tune.metric=val_loss", "tune.mode=min"])
    with pytest.raises(ConfigError, match=r"config.yaml was changed since the study started \(train.epochs 4 -> 5, "
                                          r"tune.metric 'val_acc' -> 'val_loss', tune.mode 'max' -> 'min'\)"):
        study.check_start(edited, str(first), None)
    moved_data = load_config(None, ["train.epochs=4", "data.path=/elsewhere/cifar10"])
    study.check_start(moved_data, str(first), None)  # where the data is read from may change
    assert "the data is read from /elsewhere/cifar10 now" in capsys.readouterr().out

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / study.STUDY_START).write_text((first / study.STUDY_START).read_text())
    with pytest.raises(ConfigError, match=rf"this study was started in {first}, .* it resumes only there \(move or "
                                          rf"copy it back, then --resume {first}\)"):  # a copy: the first is there
        study.check_start(cfg, str(copy), None)
    # Moved: the line offers a link at the first place, and with that link the study resumes by either name.
    moved = tmp_path / "moved"
    first.rename(moved)
    with pytest.raises(ConfigError, match=rf"then --resume {first}, or leave a link there to where it is now: ln -s "
                                          rf"{moved} {first}\)"):
        study.check_start(cfg, str(moved), None)
    elsewhere = json.loads((moved / study.STUDY_START).read_text())
    (moved / study.STUDY_START).write_text(json.dumps({**elsewhere, "location": str(tmp_path / "gone" / "first")}))
    with pytest.raises(ConfigError, match=rf"to where it is now: mkdir -p {tmp_path / 'gone'} && ln -s {moved} "
                                          rf"{tmp_path / 'gone' / 'first'}\)"):  # from a machine with no such folder
        study.check_start(cfg, str(moved), None)
    (moved / study.STUDY_START).write_text(json.dumps(elsewhere))
    os.symlink(moved, first)
    study.check_start(cfg, str(moved), None)
    study.check_start(cfg, str(first), None)
    first.unlink()
    moved.rename(first)
    # A study in a bucket resumes from any head (its local copy's folder differs), but not from another URI.
    (copy / study.STUDY_START).write_text(json.dumps({"location": "s3://b/x", "config": start["config"]}))
    study.check_start(cfg, str(copy), "s3://b/x")
    with pytest.raises(ConfigError, match=r"started in s3://b/x"):
        study.check_start(cfg, str(copy), "s3://b/y")
    # A damaged record is written again (one line), as a study from before it gets its first.
    (copy / study.STUDY_START).write_text('{"loc')
    study.check_start(cfg, str(copy), None)
    assert "study-start.json is damaged" in capsys.readouterr().out
    assert json.loads((copy / study.STUDY_START).read_text())["location"] == os.path.realpath(copy)
    # Lost (or damaged) in a copy whose trials' checkpoints name the first folder: refused all the same. It resumed
    # into the first folder's trials.json and Tune state, then failed in Ray.
    (copy / "trials.json").write_text(json.dumps({"a": {"status": "running", "epochs": 1, "latest_checkpoint": str(
        first / "ray" / "trial-a" / "checkpoint_000001")}}))
    for lost in ("gone", "damaged"):
        if lost == "gone":
            (copy / study.STUDY_START).unlink()
        else:
            (copy / study.STUDY_START).write_text('{"loc')
        with pytest.raises(ConfigError, match=rf"this study was started in {first}, .* it resumes only there"):
            study.check_start(cfg, str(copy), None)
    (first / "trials.json").write_text((copy / "trials.json").read_text())  # the first folder's own: fine
    (first / study.STUDY_START).unlink()
    study.check_start(cfg, str(first), None)


def test_resume_of_a_finished_study_rebuilds_its_damaged_results_from_the_checkpoints(tmp_path, capsys):
    """--resume said "already finished" and did nothing, and the report refused the damaged file: the per-epoch
    history of a study was lost, though each trial's newest checkpoint carries it."""
    from ray_cifar import tune

    out = tmp_path / "study"
    rows = [{"trial_id": "a", "epoch": e, "val_acc": e / 10, "train_loss": 1.0, "val_loss": 1.0} for e in (1, 2)]
    folder = out / "ray" / "trial-a" / "checkpoint_000002"
    folder.mkdir(parents=True)
    checkpoint.save_state({"epoch": 2, "history": rows}, str(folder))
    (out / "config.yaml").write_text(yaml.safe_dump(resolved_config({"train": {"epochs": 2}})))
    (out / "trials.json").write_text(json.dumps({"a": {"status": "completed", "epochs": 2,
                                                       "latest_checkpoint": str(folder)}}))
    write_rows(rows, str(out / "results.parquet"))
    (out / FINISHED).write_text("{}")
    (out / "ray" / "tune").mkdir()
    (out / "ray" / "tune" / "tuner.pkl").write_bytes(b"")  # what Tune looks for in a study it can restore
    (out / "results.parquet").write_bytes((out / "results.parquet").read_bytes()[:100])  # truncated
    assert report.main([str(out)]) == 2
    assert (f"--resume {out} rebuilds it (the rows from the trials' checkpoints, trials.parquet from trials.json)"
            in capsys.readouterr().err)
    assert tune.main(["--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recovered 2 row(s) from checkpoints" in printed and f"{out}: results.parquet, trials.parquet rebuilt" in printed
    assert [(r["trial_id"], r["epoch"], r["val_acc"]) for r in ResultsLog(str(out)).read()] == [("a", 1, 0.1),
                                                                                              ("a", 2, 0.2)]
    assert (out / "results.parquet.damaged").exists() and (out / "report.md").exists()
    assert tune.main(["--resume", str(out)]) == 0 and "has already finished" in capsys.readouterr().out


def test_rows_recovered_from_a_checkpoint_are_the_rows_the_trial_reported(tmp_path, synthetic_parquet_dir, monkeypatch):
    """A damaged results part's rows come back from the trial's newest checkpoint with what the trial reported
    beside the loop's metrics: the node it ran on, its start-up seconds and their phases, PBT's lineage, and the
    checkpoint itself. Before, the checkpoint's history held the loop's metrics alone, and the recovered rows had
    no nodes, no start-up and no checkpoint_path: the trial's start-up figures and its checkpoint were gone from
    the study's results. A real one-rank trial's code (run_rank, its store and the recorder), without Ray."""
    from types import SimpleNamespace

    from conftest import TINY_MODEL
    from ray_cifar.tuning import trial as trial_mod
    from ray_cifar.tuning.recorder import StudyRecorder
    from ray_cifar.validation import load_config

    monkeypatch.setattr(trial_mod, "_rank_nodes", lambda world_size: "node-a")  # Ray's node id, without Ray
    cfg = load_config(None, TINY_MODEL + ["train.epochs=2", "data.val_size=100", "train.global_batch_size=100",
                                          "data.pipeline=torch", "train.torch_threads=1",
                                          f"data.path={synthetic_parquet_dir}"])
    out = str(tmp_path / "study")
    store = CheckpointStore(str(tmp_path / "ray" / "trial-a"))
    recorder = StudyRecorder(out, lambda config: {}, "val_acc", "max", {}, tensorboard=False)
    trial = SimpleNamespace(trial_id="a", config={})

    def report(metrics, directory, epoch, best_epoch):  # train_in_trial_process's, to the recorder
        assert "ended_at" not in metrics  # the checkpoint's, not a column of Tune's tables
        metrics["checkpoint_path"] = store.save(directory, epoch, best_epoch)
        recorder.on_trial_result(epoch, [], trial, dict(metrics))

    started = __import__("time").time()
    where = trial_mod.Rank(0, 1, 1, torch.device("cpu"), store.latest, report)
    trial_mod.run_rank(cfg, where, trial_mod.PhaseClock(started), started, {"pbt_generation": 1, "pbt_parent": "b"})
    reported = ResultsLog(out).read()
    assert [r["epoch"] for r in reported] == [1, 2] and reported[0]["startup_seconds"] > 0

    parts = sorted((tmp_path / "study" / ResultsLog.PARTS).iterdir())
    for part in parts:
        damage(part, "truncated")
    StudyRecorder(out, lambda config: {}, "val_acc", "max", {}, tensorboard=False)  # sets them aside, recovers
    recovered = ResultsLog(out).read()
    unset = ("time", "timing_checkpoint_save_seconds", "checkpoint_path")  # the save's, after the state is written
    for got, want in zip(recovered, reported):  # when the epoch ended, not when it was recovered (seconds later)
        assert got["time"] <= want["time"]
    def kept(row):  # (a part's rows have its own columns; one merged part gives every row all of them)
        return {k: v for k, v in row.items() if k not in unset and v is not None}

    for got, want in zip(recovered, reported, strict=True):
        assert kept(got) == kept(want)
    assert recovered[0]["nodes"] == "node-a" and recovered[0]["timing_data_load_seconds"] is not None
    assert recovered[1]["pbt_parent"] == "b"
    # The checkpoint's own epoch names it; an epoch before it names none (its folder may be gone).
    assert recovered[1]["checkpoint_path"] == reported[1]["checkpoint_path"]
    assert recovered[0]["checkpoint_path"] is None


def test_a_damaged_part_brings_back_the_recorded_epochs_and_leaves_the_unreported_to_come_as_results(tmp_path):
    """The checkpoint's history can run past what trials.json counts as recorded (a driver killed between a
    checkpoint and its report). Those epochs were recovered with the damaged part's rows, marked seen, and never
    reached the trial's summary: the final table said best val_acc 0.1925 at epoch 1 beside a row of 0.2175 at
    epoch 2, and ASHA stopped the trial at a rung that row had passed. Now they come as results, as any
    checkpointed-but-unreported epoch does."""
    from types import SimpleNamespace

    from ray_cifar.tuning.recorder import StudyRecorder

    out = tmp_path / "study"
    history = [{"epoch": 1, "epochs": 4, "val_acc": 0.1925}, {"epoch": 2, "epochs": 4, "val_acc": 0.2175}]
    folder = tmp_path / "ray" / "trial-a" / "checkpoint_000002"
    folder.mkdir(parents=True)
    checkpoint.save_state({"epoch": 2, "history": history}, str(folder))
    recorder = StudyRecorder(str(out), lambda config: {}, "val_acc", "max", {}, tensorboard=False)
    trial = SimpleNamespace(trial_id="a", config={})
    recorder.on_trial_result(1, [], trial, {**history[0], "checkpoint_path": str(folder)})  # epoch 2: never reported
    damage(next((out / ResultsLog.PARTS).iterdir()), "truncated")

    again = StudyRecorder(str(out), lambda config: {}, "val_acc", "max", {}, tensorboard=False)
    assert [(r["trial_id"], r["epoch"]) for r in ResultsLog(str(out)).read()] == [("a", 1)]
    assert ("a", 2) not in again.seen
    # The trial's resume reports its checkpoint's history with its next epoch: epoch 2 is recorded there, in the
    # rows and in the summary alike.
    again.on_trial_result(2, [], trial, {"epoch": 3, "epochs": 4, "val_acc": 0.21, "history": history})
    assert [r["epoch"] for r in ResultsLog(str(out)).read()] == [1, 2, 3]
    assert (again.trials["a"]["best_epoch"], again.trials["a"]["best_metric"]) == (2, 0.2175)



def _finished_study(out) -> None:
    """A finished one-trial study as finish_study leaves it (its trial's checkpoint holds epochs 1-2)."""
    from ray_cifar.tuning import study

    rows = [{"trial_id": "a", "epoch": e, "val_acc": e / 10, "train_loss": 1.0, "val_loss": 1.0} for e in (1, 2)]
    folder = out / "ray" / "trial-a" / "checkpoint_000002"
    folder.mkdir(parents=True)
    checkpoint.save_state({"epoch": 2, "history": rows}, str(folder))
    (out / "config.yaml").write_text(yaml.safe_dump(resolved_config({"train": {"epochs": 2}})))
    summary = {"trial_id": "a", "status": "completed", "epochs": 2, "best_metric": 0.2, "best_epoch": 2,
               "latest_checkpoint": str(folder), "best_checkpoint": str(folder)}
    (out / "trials.json").write_text(json.dumps({"a": summary}))
    write_rows(rows, str(out / "results.parquet"))
    write_rows([{**summary, "test_acc": 0.19, "test_loss": 2.0}], str(out / "trials.parquet"))
    (out / FINISHED).write_text(json.dumps({"finished": 0, "failed": [],
                                                  "test": {"a": {"test_acc": 0.19, "test_loss": 2.0}}}))
    (out / "ray" / "tune").mkdir()
    (out / "ray" / "tune" / "tuner.pkl").write_bytes(b"")


@pytest.mark.parametrize("case", ["results missing", "trials.parquet damaged", "trials.parquet missing",
                                  "trials.json damaged"])
def test_resume_of_a_finished_study_rebuilds_each_file_it_lost(tmp_path, capsys, case):
    """--resume said "already finished" (pointing at a trials.parquet that was gone, or damaged) and left the study
    so; the report drew an empty one over a good one where results.parquet was gone, and sent the user to --resume
    where trials.parquet was damaged."""
    from ray_cifar import tune

    out = tmp_path / "study"
    _finished_study(out)
    {"results missing": lambda: (out / "results.parquet").unlink(),
     "trials.parquet damaged": lambda: damage(out / "trials.parquet", "truncated"),
     "trials.parquet missing": lambda: (out / "trials.parquet").unlink(),
     "trials.json damaged": lambda: damage(out / "trials.json", "random bytes")}[case]()
    if case != "trials.json damaged":  # (a finished study's report reads trials.parquet)
        assert report.main([str(out)]) == 2
        assert f"--resume {out} rebuilds it" in capsys.readouterr().err
    assert tune.main(["--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rebuilt" in printed and "has already finished" not in printed
    assert [(r["epoch"], r["val_acc"]) for r in ResultsLog(str(out)).read()] == [(1, 0.1), (2, 0.2)]
    (trial,) = read_rows(str(out / "trials.parquet"))
    assert (trial["trial_id"], trial["status"], trial["best_epoch"], trial["test_acc"]) == ("a", "completed", 2, 0.19)
    assert json.loads((out / "trials.json").read_text())["a"]["status"] == "completed"
    assert report.main([str(out)]) == 0 and "best trial `a` (0.2000 at epoch 2, test_acc 0.1900)" in \
        (out / "report.md").read_text()
    assert tune.main(["--resume", str(out)]) == 0 and "has already finished" in capsys.readouterr().out


def test_a_config_yaml_cut_short_is_damaged_not_read_with_defaults(tmp_path, capsys):
    """Truncated, it still parsed: without its tune section (the last one) a study of val_loss (min) was reported
    ranked by val_acc (max), exit 0; --resume called it an edit to undo."""
    full = resolved_config({"tune": {"metric": "val_loss", "mode": "min"}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    write_rows([{"trial_id": "a", "epoch": 1, "val_acc": 0.5, "val_loss": 1.0}], str(tmp_path / "results.parquet"))
    assert report.main([str(tmp_path)]) == 0
    assert "Ranked by `val_loss` (min)" in (tmp_path / "report.md").read_text()
    for cut in ({k: v for k, v in full.items() if k != "tune"},
                {**full, "tune": {k: v for k, v in full["tune"].items() if k not in ("metric", "mode")}}):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cut, sort_keys=False))
        assert report.main([str(tmp_path)]) == 2
        assert "config.yaml is damaged (" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_:
            cli.load_resolved_config(str(tmp_path))
        assert exit_.value.code == 2 and "cut short?" in capsys.readouterr().err
    # As the study writes it, a cut anywhere: one kept tune's metric and mode and lost ASHA's knobs, its search space
    # and published figures, and the report said "asha: grace -, reduction -".
    cfg = cli.load_config(None, ["tune.metric=val_loss", "tune.mode=min", "tune.grace_period=3"])
    cli.write_config(cfg, str(tmp_path))
    text = (tmp_path / "config.yaml").read_text()
    assert cli.load_resolved_config(str(tmp_path)).tune.grace_period == 3 and report.main([str(tmp_path)]) == 0
    for cut in (text.index("grace_period"), len(text) - 1, len(text) - len("# end of the resolved config\n")):
        (tmp_path / "config.yaml").write_text(text[:cut])
        assert report.main([str(tmp_path)]) == 2
        assert "config.yaml is damaged (its last line, '# end of the resolved config', is missing: cut short?)" in \
            capsys.readouterr().err
        with pytest.raises(SystemExit):
            cli.load_resolved_config(str(tmp_path))
        assert "cut short?" in capsys.readouterr().err
