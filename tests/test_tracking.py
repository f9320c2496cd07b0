"""tune.tracking: real MLflow (sqlite under OUTPUT) and W&B (offline) runs of a real study, read back with
MLflow's own client and W&B's record files.

A killed study per tracker. MLflow's is test_fault_tolerance's killed grid study (its trial list put back, a
trial made again), read back there. W&B's, with RAY_CIFAR_LONG_TESTS=1, here (module-scoped): two 1-rank trials,
the driver SIGKILLed once a trial has recorded epoch 2, then continued by the same command line with
`--resume-if-exists`, as cluster/kuberay-rayjob.yaml's retried job does. The assertions read that one study: one
tracker run per trial with its searched values and seed, every epoch once (step = epoch), the status at the end,
the study's files attached. The rest, each tracker's own part, without a study.
Every process killed here is one this test started (the driver) or a descendant of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import TINY_MODEL, long_test
from ray_cifar.tuning import tracking
from ray_cifar.results import ResultsLog

# Enough epochs that a trial stays running past epoch 2 for longer than the kill's poll (0.5 s) on a quiet machine:
# at 4, a tiny epoch of ~0.2 s let the study end between two polls.
EPOCHS = 8
LRS = [0.05, 0.03]
SETS = TINY_MODEL + ["data.pipeline=torch", "train.torch_threads=1", "train.num_workers=1",
                     "train.global_batch_size=50", "data.val_size=100", "tune.scheduler=fifo",
                     "tune.max_concurrent_trials=2", f"train.epochs={EPOCHS}",
                     f"tune.search_space={{optim.lr: {{grid: {LRS}}}}}", "tune.dashboard=false"]


def clean_env() -> dict[str, str]:
    """No W&B account or mode from the machine running the tests: the tracker must choose offline itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}


@pytest.fixture(scope="module")
def wandb_study(tmp_path_factory, synthetic_parquet_dir) -> dict:
    """Started and continued as cluster/kuberay-rayjob.yaml's entrypoint does: the same command line, with
    --resume-if-exists. The tracker's kill and resume is MLflow's in every run (test_fault_tolerance's killed grid
    study is tracked by MLflow); W&B's skip of the steps on disk is checked on its real files below, and a killed
    study continued by its retried command line in test_remote_output."""
    from test_fault_tolerance import kill_driver_when, study_args, trials_state

    long_test("a killed study tracked by W&B, as the MLflow one")
    pytest.importorskip("wandb", reason="pip install 'ray_cifar[tracking]'")
    output = tmp_path_factory.mktemp("wandb") / "study-wandb"
    args = study_args(synthetic_parquet_dir, output, *SETS, "tune.tracking=wandb") + ["--resume-if-exists"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=clean_env())

    def a_trial_past_epoch_two():
        # The recorder logs a row to the tracker before it takes the next result, so epoch 1 is in
        # the tracker when epoch 2's row is written: the resumed driver must skip what is there.
        return any(t.get("epochs", 0) >= 2 and t["status"] == "running" for t in trials_state(output).values())

    def running_trials() -> list[str]:
        return [t["trial_id"] for t in trials_state(output).values() if t["status"] == "running"]

    running = kill_driver_when(proc, a_trial_past_epoch_two, "a trial's second epoch", running_trials, timeout=600)
    assert not os.path.exists(output / "study-finished.json"), "the study finished before the driver was killed"
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=900, env=clean_env())
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "resuming study" in resumed.stdout
    trials = trials_state(output)
    assert sorted(t["status"] for t in trials.values()) == ["completed", "completed"]
    return {"output": output, "trials": trials, "running": running, "stdout": resumed.stdout}


def recorded_epochs(output, trial_id: str) -> list[int]:
    return sorted(r["epoch"] for r in ResultsLog(str(output)).read() if r["trial_id"] == trial_id)


@pytest.mark.integration
def test_wandb_offline_one_run_per_trial_every_epoch_once_after_a_killed_driver(wandb_study):
    output, trials = wandb_study["output"], wandb_study["trials"]
    reopened = 0
    for trial_id, summary in trials.items():
        files = tracking.offline_runs(str(output), f"study-wandb-{trial_id}")
        assert files, f"no offline W&B run for {trial_id}"
        reopened += len(files) > 2  # the last start is the study's end reopening it for its end figures
        steps = [s["_step"] for path in files for s in tracking.wandb_history(path)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)) == recorded_epochs(output, trial_id)  # each epoch once
        config, group, status = run_metadata(files[-1])
        assert group == "study-wandb" and config["train.seed"] == 0 and config["optim.lr"] in LRS
        assert status == "completed"
        assert wandb_summary(files[-1])["best_epoch"] == summary["best_epoch"]  # its end figures
    # The trials the kill interrupted were opened again by the resumed driver (another offline folder). W&B
    # writes a run's file every 15 s: what the killed driver logged since is lost with it, and the resumed
    # driver logs it again from results.parquet (test_wandb_reopened_run_skips_the_steps_on_disk: the skip).
    assert reopened == len(wandb_study["running"]) >= 1
    assert "holds a study: continuing it" in wandb_study["stdout"]  # the retried job's command line resumed it
    study_files = tracking.offline_runs(str(output), "study-wandb-study")
    assert study_files and {"trials.parquet", "ranking.png"} <= artifact_files(study_files[-1])


def run_metadata(path: str) -> tuple[dict, str, str | None]:
    """(config, group, summary status) of one offline run file."""
    import json

    config, group, status = {}, "", None
    for record in tracking.wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            group = record.run.run_group
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                if item.key == "status":
                    status = json.loads(item.value_json)
    return config, group, status


def artifact_files(path: str) -> set[str]:
    names = set()
    for record in tracking.wandb_records(path):
        if record.WhichOneof("record_type") == "artifact":
            names.update(os.path.basename(e.path) for e in record.artifact.manifest.contents)
    return names


def wait_for_steps(path: str, steps: list[int]) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and [s["_step"] for s in tracking.wandb_history(path)] != steps:
        time.sleep(0.2)  # run.finish() returns before W&B's writer has written the file
    assert [s["_step"] for s in tracking.wandb_history(path)] == steps


def test_wandb_reopened_run_skips_the_steps_on_disk_and_reader_stops_at_a_torn_tail(tmp_path, monkeypatch):
    """A new driver (a new tracker) reads the steps an offline run's earlier files hold and logs only later
    ones; a killed driver's half-written record ends the reader, no exception."""
    pytest.importorskip("wandb", reason="pip install 'ray_cifar[tracking]'")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    rows = [{"trial_id": "t1", "epoch": e, "val_acc": e / 10} for e in (1, 2, 3)]
    first = tracking.create_tracker("wandb", str(tmp_path), "reopen")
    assert first.mode == "offline"
    assert first.log_epochs("t1", {"optim.lr": 0.1}, rows[:2]) == 2
    first.close()  # the driver stops with the trial unfinished
    wait_for_steps(tracking.offline_runs(str(tmp_path), "reopen-t1")[0], [1, 2])
    # W&B names an offline run's folder by the second it starts: a run reopened within the same second writes
    # into the first one's folder. A new driver comes seconds after the old one; here, the next second.
    time.sleep(1.05 - time.time() % 1)

    second = tracking.create_tracker("wandb", str(tmp_path), "reopen")
    assert second.log_epochs("t1", {"optim.lr": 0.1}, rows) == 1  # epoch 3 only
    second.end_trial("t1", {"optim.lr": 0.1}, "completed")
    files = tracking.offline_runs(str(tmp_path), "reopen-t1")
    assert len(files) == 2
    wait_for_steps(files[1], [3])

    whole = open(files[0], "rb").read()
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(whole[: len(whole) - 40])
    assert [s["_step"] for s in tracking.wandb_history(str(torn))] in ([1, 2], [1])  # whole records only


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, synthetic_parquet_dir, monkeypatch, capsys):
    from ray_cifar import tune

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError, as when not installed
    with pytest.raises(SystemExit) as exit_:
        tune.main(["--data", synthetic_parquet_dir, "--output", str(tmp_path / "out"), "--set", "tune.tracking=mlflow",
                   *sum([["--set", s] for s in SETS], [])])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().count("\n") == 0, err
    assert "ray_cifar: error: tune.tracking=mlflow" in err and tracking.EXTRA in err
    assert not (tmp_path / "out").exists()  # refused before any work: the new output folder is gone again


def test_a_study_that_does_not_track_never_imports_mlflow_or_wandb(tmp_path):
    """`import mlflow` alone takes ~3 s and `import wandb` ~1 s: only a study that tracks pays for them."""
    code = ("import sys, ray_cifar.tune, ray_cifar.tuning.study, ray_cifar.tuning.recorder, ray_cifar.tuning.tracking, ray_cifar.cli\n"
            "from ray_cifar.tuning.recorder import StudyRecorder\n"
            "StudyRecorder(sys.argv[1], lambda config: {}, 'val_acc', 'max', tracking=None)\n"
            "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'wandb')))\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout


def test_mlflow_run_of_a_lost_trial_is_ended_as_killed(tmp_path):
    """A trial Tune's restored study no longer holds (recorder.LOST) would leave its MLflow run RUNNING for ever:
    the recorder ends it at the experiment's end, status tag `lost`, run KILLED; a completed trial stays FINISHED."""
    pytest.importorskip("mlflow", reason="pip install 'ray_cifar[tracking]'")
    from mlflow import MlflowClient

    from ray_cifar.tuning.recorder import StudyRecorder

    def recorder():
        return StudyRecorder(str(tmp_path), lambda config: {"optim.lr": config["optim.lr"]}, "val_acc", "max",
                             tensorboard=False, tracking={"tracking": "mlflow", "study": "s", "uri": None,
                                                          "project": None})

    trials = [SimpleNamespace(trial_id=tid, config={"optim.lr": lr}, status="TERMINATED")
              for tid, lr in (("t0", 0.1), ("t1", 0.01))]
    first = recorder()
    for trial in trials:
        first.on_trial_result(0, trials, trial, {"epoch": 1, "epochs": 1, "val_acc": 0.5})
    resumed = recorder()  # a new driver whose Tune knows t0 only
    resumed.on_trial_complete(0, trials[:1], trials[0])
    resumed.on_experiment_end(trials[:1])
    client = MlflowClient(f"sqlite:///{tmp_path}/{tracking.MLFLOW_DB}")
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    ended = {r.data.tags[tracking.TRIAL_TAG]: (r.info.status, r.data.tags[tracking.STATUS_TAG],
                                               r.data.params["optim.lr"])
             for r in runs if r.data.tags.get("ray_cifar.kind") == "trial"}
    assert ended == {"t0": ("FINISHED", "completed", "0.1"), "t1": ("KILLED", "lost", "0.01")}


def test_mlflow_with_a_sqlite_uri_keeps_its_artifacts_under_output_and_attaches_the_reports_figures(tmp_path,
                                                                                                    monkeypatch):
    """A given sqlite URI's artifacts went to ./mlruns of the folder the driver was started from, and the study run
    had the report without figures/, its images broken."""
    pytest.importorskip("mlflow", reason="pip install 'ray_cifar[tracking]'")
    output, elsewhere = tmp_path / "study", tmp_path / "started-here"
    (output / "figures").mkdir(parents=True)
    elsewhere.mkdir()
    (output / "report.html").write_text('<img src="figures/ranking.png">')
    (output / "figures" / "ranking.png").write_bytes(b"\x89PNG")
    monkeypatch.chdir(elsewhere)
    tracker = tracking.MLflowTracker(str(output), "s", f"sqlite:///{tmp_path}/shared.db", None)
    tracker.attach_study([str(output / "report.html"), str(output / "figures")])
    stored = sorted(str(p.relative_to(output / tracking.MLFLOW_ARTIFACTS)).split(os.sep, 2)[-1]  # past RUN/artifacts/
                    for p in (output / tracking.MLFLOW_ARTIFACTS).rglob("*") if p.is_file())
    assert stored == ["figures/ranking.png", "report.html"], stored
    assert not os.listdir(elsewhere)


# -- a PBT member's changing values, the trials' end figures, the study's config -------------------------------

# A PBT member (t1) exploits t0 after epoch 2: from epoch 3 it trains with t0's lr and its own weight decay perturbed.
PBT_ROWS = [{"trial_id": "t1", "epoch": e, "optim.lr": lr, "optim.weight_decay": wd, "optim.name": "sgd",
             "train.seed": 0, "val_acc": e / 10, "pbt_generation": gen, "pbt_parent": parent}
            for e, lr, wd, gen, parent in ((1, 0.0494, 5e-4, 0, ""), (2, 0.0494, 5e-4, 0, ""),
                                           (3, 0.117, 6e-4, 1, "t0"), (4, 0.117, 6e-4, 1, "t0"))]
PBT_PARAMS = {"optim.lr": 0.0494, "optim.weight_decay": 5e-4, "optim.name": "sgd", "train.seed": 0}
CONFIG_YAML = """# resolved
data:
  val_size: 100
optim:
  lr: 0.1
  weight_decay: 0.0005
train:
  epochs: 4
  seed: 0
tune:
  scheduler: fifo
  metric: val_loss
  mode: min
  search_space:
    optim.lr:
      grid: [0.05, 0.03]
published: []
"""
# trials.parquet's rows as finish_study writes them (best first; tune.test best: test figures for the best only).
TRIALS = [{"trial_id": "t0", "optim.lr": 0.05, "train.seed": 0, "status": "completed", "epochs": 3, "best_metric": 0.4,
           "best_epoch": 2, "best_val_acc": 0.8, "test_acc": 0.79, "test_loss": 0.41},
          {"trial_id": "t1", "optim.lr": 0.03, "train.seed": 0, "status": "stopped", "epochs": 3, "best_metric": 0.6,
           "best_epoch": 3, "best_val_acc": 0.7, "test_acc": None, "test_loss": None},
          {"trial_id": "t2", "optim.lr": 0.01, "train.seed": 0, "status": "failed", "epochs": 0, "best_metric": None,
           "best_epoch": None, "best_val_acc": None, "test_acc": None, "test_loss": None}]  # never tracked


def finished_study(output) -> list[str]:
    """OUTPUT with config.yaml and trials.parquet (TRIALS); the paths study.attach_to_tracker gives attach_study."""
    from ray_cifar.results import write_rows

    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(CONFIG_YAML)
    write_rows(TRIALS, str(output / "trials.parquet"))
    return [str(output / "trials.parquet"), str(output / "report.html")]


def epoch_rows(trial: dict) -> list[dict]:
    return [{"trial_id": trial["trial_id"], "epoch": e, "optim.lr": trial["optim.lr"], "train.seed": 0,
             "val_loss": 1 - e / 10} for e in range(1, trial["epochs"] + 1)]


def mlflow_runs(output, study: str = "s"):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{output}/{tracking.MLFLOW_DB}")
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    return client, {r.data.tags.get(tracking.TRIAL_TAG, "study"): r for r in runs}


def test_mlflow_pbt_member_logs_the_values_in_force_each_epoch_and_its_donor(tmp_path):
    """Params are write-once: an exploited member's run showed its first lr (0.0494) while trials.parquet said
    0.117, and its donor was nowhere. Its values are metrics at step = epoch, its donors tags; a study without
    PBT logs its values as params only."""
    pytest.importorskip("mlflow", reason="pip install 'ray_cifar[tracking]'")
    tracker = tracking.MLflowTracker(str(tmp_path), "s", None, None)
    tracker.log_epochs("t1", PBT_PARAMS, PBT_ROWS[:3])
    tracker.end_trial("t1", PBT_PARAMS, "completed")
    again = tracking.MLflowTracker(str(tmp_path), "s", None, None)  # a new driver: epoch 4 only
    assert again.log_epochs("t1", {**PBT_PARAMS, "optim.lr": 0.117}, PBT_ROWS) == 1
    again.log_epochs("t9", {"optim.lr": 0.1}, [{"trial_id": "t9", "epoch": 1, "optim.lr": 0.1, "val_acc": 0.5}])
    client, runs = mlflow_runs(tmp_path)
    run = runs["t1"]
    assert run.data.params["optim.lr"] == "0.0494"  # the first values, as before
    lrs = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "optim.lr")]
    assert sorted(lrs) == [(1, 0.0494), (2, 0.0494), (3, 0.117), (4, 0.117)]
    assert run.data.metrics["optim.weight_decay"] == 6e-4 and run.data.metrics["pbt_generation"] == 1
    assert "optim.name" not in run.data.metrics  # text: in the generation's tag
    tags = run.data.tags
    assert tags["ray_cifar.pbt_parent"] == "t0" and tags["ray_cifar.pbt_generation"] == "1"
    assert json.loads(tags["ray_cifar.pbt_generation.1"]) == {"pbt_parent": "t0", "optim.lr": 0.117,
                                                               "optim.weight_decay": 6e-4, "optim.name": "sgd",
                                                               "train.seed": 0}
    assert json.loads(tags["ray_cifar.pbt_generation.0"])["optim.lr"] == 0.0494
    assert "optim.lr" not in runs["t9"].data.metrics and runs["t9"].data.params["optim.lr"] == "0.1"
    assert not any(t.startswith("ray_cifar.pbt") for t in runs["t9"].data.tags)


def test_mlflow_trial_end_figures_on_its_run_and_the_study_config_as_study_params(tmp_path):
    """test_acc/test_loss, best_epoch and the best tune.metric were in trials.parquet only, and the study run had
    no params."""
    pytest.importorskip("mlflow", reason="pip install 'ray_cifar[tracking]'")
    paths = finished_study(tmp_path)
    tracker = tracking.MLflowTracker(str(tmp_path), "s", None, None)
    for trial in TRIALS[:2]:
        tracker.log_epochs(trial["trial_id"], {"optim.lr": trial["optim.lr"], "train.seed": 0}, epoch_rows(trial))
        tracker.end_trial(trial["trial_id"], {"optim.lr": trial["optim.lr"], "train.seed": 0}, trial["status"])
    for _ in range(2):  # a second attach (a study finished again) logs nothing twice
        tracking.create_tracker("mlflow", str(tmp_path), "s").attach_study(paths)
    client, runs = mlflow_runs(tmp_path)
    assert set(runs) == {"t0", "t1", "study"}  # no run made for a trial that never had one
    best = runs["t0"]
    assert {k: best.data.metrics[k] for k in ("best_val_loss", "best_epoch", "best_val_acc", "test_acc", "test_loss")} \
        == {"best_val_loss": 0.4, "best_epoch": 2, "best_val_acc": 0.8, "test_acc": 0.79, "test_loss": 0.41}
    assert [(m.step, m.value) for m in client.get_metric_history(best.info.run_id, "test_acc")] == [(2, 0.79)]
    other = runs["t1"].data.metrics
    assert other["best_val_loss"] == 0.6 and other["best_epoch"] == 3 and "test_acc" not in other
    assert best.info.status == "FINISHED" and best.data.tags[tracking.STATUS_TAG] == "completed"
    params = runs["study"].data.params
    assert params["train.epochs"] == "4" and params["tune.metric"] == "val_loss" and params["published"] == "[]"
    assert json.loads(params["tune.search_space"]) == {"optim.lr": {"grid": [0.05, 0.03]}}
    assert "optim.lr" not in params and params["optim.weight_decay"] == "0.0005"  # searched fields: each trial's


def wandb_summary(path: str) -> dict:
    summary = {}
    for record in tracking.wandb_records(path):
        if record.WhichOneof("record_type") == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
    return summary


def wait_for(what, check, seconds: float = 60):
    deadline = time.time() + seconds
    while time.time() < deadline and not check():
        time.sleep(0.2)  # run.finish() returns before W&B's writer has written the file
    assert check(), what


def test_wandb_pbt_values_per_step_and_end_figures_in_the_summary(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'ray_cifar[tracking]'")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    paths = finished_study(tmp_path)
    tracker = tracking.create_tracker("wandb", str(tmp_path), "s")
    tracker.log_epochs("t1", PBT_PARAMS, PBT_ROWS)
    tracker.end_trial("t1", PBT_PARAMS, "stopped")
    tracker.log_epochs("t0", {"optim.lr": 0.05, "train.seed": 0}, epoch_rows(TRIALS[0]))
    tracker.end_trial("t0", {"optim.lr": 0.05, "train.seed": 0}, "completed")
    first = tracking.offline_runs(str(tmp_path), "s-t1")[0]
    wait_for("t1's steps", lambda: len(tracking.wandb_history(first)) == 4)
    assert [(s["_step"], s["optim.lr"]) for s in tracking.wandb_history(first)] == [
        (1, 0.0494), (2, 0.0494), (3, 0.117), (4, 0.117)]
    pbt = wandb_summary(first)
    assert pbt["pbt_parent"] == "t0" and pbt["pbt_generation"] == 1 and pbt["pbt_generation_1"]["optim.lr"] == 0.117
    assert "optim.lr" not in tracking.wandb_history(tracking.offline_runs(str(tmp_path), "s-t0")[0])[0]

    tracking.create_tracker("wandb", str(tmp_path), "s").attach_study(paths)
    files = tracking.offline_runs(str(tmp_path), "s-t0")
    assert len(files) == 2  # reopened (resume="allow") for its end figures
    wait_for("t0's end figures", lambda: "test_acc" in wandb_summary(files[-1]))
    summary = wandb_summary(files[-1])
    assert {k: summary[k] for k in ("best_val_loss", "best_epoch", "test_acc", "test_loss", "status")} == {
        "best_val_loss": 0.4, "best_epoch": 2, "test_acc": 0.79, "test_loss": 0.41, "status": "completed"}
    config, _, _ = run_metadata(files[-1])
    assert config["optim.lr"] == 0.05 and config["train.seed"] == 0
    assert not tracking.offline_runs(str(tmp_path), "s-t2")  # never tracked: no run made for it
    study = tracking.offline_runs(str(tmp_path), "s-study")[-1]
    wait_for("the study run's config", lambda: run_metadata(study)[0].get("train.epochs") == 4)
    assert run_metadata(study)[0]["tune.metric"] == "val_loss"
