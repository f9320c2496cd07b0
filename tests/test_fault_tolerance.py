"""Fault tolerance with real processes on a real local Ray cluster.

(a)+(c) One 2-rank DDP trial runs twice with the same config: once undisturbed (`python -m ray_cifar.train`'s DDP
        path, a study of one TorchTrainer trial), once as a study with one rank's worker process SIGKILLed after
        epoch 2 was reported. Ray Train restarts the worker group from the last checkpoint. The same with one rank:
        its undisturbed run is one plain process without Ray, and its trial trains in its Tune trial process, so
        Tune runs the trial again from its latest checkpoint. Either way the trial completes, no epoch is recorded
        twice, and the torch pipeline continues *exactly*: every later epoch's metrics and the final weights equal
        the undisturbed run's (fp32, GroupNorm, one thread per rank: CPU float results repeat bit for bit;
        tolerance 1e-6 absolute only guards against reduction-order noise). Only with RAY_CIFAR_LONG_TESTS=1 (the
        test says what covers each part in every run).
(b)+(d) A three-trial study (two of one rank, one with an absurd lr, then a 2-rank DDP trial) has its driver
        SIGKILLed while the third trial runs;
        its Ray Train checkpoints but the oldest are then truncated; `--resume` finishes it: the third
        trial resumes from the oldest with one warning line, the finished trials are not run
        again, rows are complete and unique, the absurd trial is `diverged`, the others `completed`.
(e) A driver killed before its first trial (config.yaml written, no Tune experiment): its command line with
        --resume-if-exists starts the study.
(f) A grid study killed as its second trial trains, its trial list put back from before that trial was made (its
        grid generator's state kept): `--resume` makes the trial again, under its id, from its own checkpoint. The
        study is tracked by MLflow: one run per trial, every epoch logged once across the kill.
Every process killed here is one this test started (the driver) or a descendant of it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_MODEL, long_test
from processes import cmdline, descendants, end_tree
from ray_cifar import checkpoint, console
from ray_cifar.results import ResultsLog

pytestmark = pytest.mark.integration

EPOCHS = 4
TOLERANCE = 1e-6
SETS = TINY_MODEL + ["model.norm=group", "train.amp=fp32", "data.pipeline=torch", "train.torch_threads=1",
                     "train.num_workers=2", "train.global_batch_size=50", "data.val_size=100", "optim.lr=0.05",
                     "schedule.name=cosine", "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
                     "tune.search_space={}"]
# A one-rank trial's study starts no Ray dashboard: nothing of it needs one (DDP trials do), and its ~3.5 CPU-s a
# study add up over the suite on 2 cores.
ONE_RANK = ["train.num_workers=1", "tune.dashboard=false"]


def study_args(data: str, output, *sets: str) -> list[str]:
    args = [sys.executable, "-m", "ray_cifar.tune", "--data", data, "--output", str(output)]
    return args + [a for s in sets for a in ("--set", s)]


class EndedFirst(AssertionError):
    """The study's process ended before the awaited moment (its return code: .returncode)."""

    def __init__(self, returncode: int, what: str):
        super().__init__(f"the study ended (rc {returncode}) before {what}")
        self.returncode = returncode


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise EndedFirst(proc.returncode, what)
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")



def kill_driver_when(proc: subprocess.Popen, ready, what: str, snapshot=None, timeout: float = 900):
    """Wait until ready() holds (failing if the study ends first), take snapshot(), SIGKILL the study's driver
    `proc`, and end whatever of its tree outlives it (Ray's processes fate-share with the driver; a straggler is
    still ours). Returns the snapshot."""
    try:
        wait_for(ready, timeout, what, proc)
        taken = snapshot() if snapshot else None
        tree = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        end_tree(descendants(proc.pid) + [proc.pid] if proc.poll() is None else [])
    end_tree(tree)
    return taken

class SearchStates:
    """The versions of Tune's search-algorithm files (PATTERNS: the first one's counts the trials made) seen in a
    running study's experiment folder, each set read at one moment, to put an older one back after a kill: what a
    driver killed between Tune's files (the trials, then these) leaves."""

    def __init__(self, output, *patterns: str, kind: str = "pickle"):
        self.folder, self.patterns, self.versions, self.kind = output / "ray" / "tune", patterns, [], kind

    def capture(self) -> None:
        from ray_cifar.tuning.tune_state import is_whole

        paths = [p for pattern in self.patterns for p in sorted(self.folder.glob(pattern))]
        try:
            version = {p.name: p.read_bytes() for p in paths}
        except OSError:
            return
        if (len(version) == len(self.patterns) and all(is_whole(str(p), self.kind) for p in paths)
                and version not in self.versions[-1:]):
            self.versions.append(version)

    def made(self, version: dict[str, bytes]) -> int:
        """How many trials the search algorithm had made when VERSION was saved."""
        import cloudpickle

        state = cloudpickle.loads(next(iter(version.values())))  # (the first pattern's)
        return state["counter"] if "counter" in state else max(it.counter for it in state["_iterators"])

    def put_back_newest(self, where, what: str) -> dict[str, bytes]:
        """Write over the current files the newest version for which where(version) holds; that version."""
        for version in reversed(self.versions):
            if where(version):
                for name, data in version.items():
                    (self.folder / name).write_bytes(data)
                return version
        raise AssertionError(f"no search state {what} was seen")

    def put_back_an_older_one(self) -> int:
        """Write over the current files the newest version saved before the study's last trial (as seen) was made;
        how many trials were made after it."""
        newest = self.made(self.versions[-1]) if self.versions else 0
        version = self.put_back_newest(lambda v: self.made(v) < newest, f"from before the study's trial {newest}")
        return newest - self.made(version)

    def tune_trial_ids(self) -> set[str]:
        """The trials in the experiment state a --resume restores (TuneStateBackup.restore's choice): the newest that
        reads whole, else its whole copy in the backup folder. A SIGKILL during Tune's snapshot, which copies its
        files over the experiment's in place, can leave the newest empty (seen in a suite run: it and both searcher
        files, 0 bytes)."""
        from ray_cifar.tuning.tune_state import BACKUP, is_whole

        backup = self.folder.parent.parent / BACKUP
        for newest in sorted(self.folder.glob("experiment_state-*.json"), reverse=True):
            for path in (newest, backup / newest.name):
                if is_whole(str(path), "json"):
                    return trial_ids(path.read_bytes())
        raise AssertionError(f"no experiment state in {self.folder} or {backup} reads whole")


def trial_ids(experiment_state: bytes) -> set[str]:
    """The trials in one of Tune's experiment_state files."""
    return {json.loads(state)["trial_id"] for state, _ in json.loads(experiment_state)["trial_data"]}


def trials_state(output) -> dict:
    try:
        with open(os.path.join(output, "trials.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def train_workers(pid: int) -> list[int]:
    return [p for p in descendants(pid) if "RayTrainWorker" in cmdline(p)]


def final_state(output) -> dict:
    trial = next(iter(trials_state(output).values()))
    from ray.train import Checkpoint

    with Checkpoint(trial["latest_checkpoint"]).as_directory() as d:
        return checkpoint.load_state(d)


def loads(folder) -> bool:
    try:
        checkpoint.load_state(str(folder))
    except checkpoint.CheckpointDamaged:
        return False
    return True


def trial_processes(pid: int) -> list[int]:
    """Tune's trial processes below `pid`: where a one-rank trial trains."""
    return [p for p in descendants(pid) if "ray::ImplicitFunc" in cmdline(p)]


def rank_processes(pid: int, ranks: int) -> list[int]:
    """The processes a rank of the study's trial runs in: DDP workers, or (one rank) the Tune trial process,
    and then no Train controller or worker may exist."""
    if ranks > 1:
        return train_workers(pid)
    found = trial_processes(pid)
    assert not any(w in cmdline(p) for p in descendants(pid) for w in ("RayTrainWorker", "TrainController")), \
        "a one-rank trial must train in its Tune trial process, without a Train worker group"
    return found


@pytest.mark.parametrize("ranks", [2, 1], ids=["ddp-2-ranks", "one-rank-in-trial-process"])
def test_killed_rank_resumes_from_its_checkpoint_and_continues_exactly(tmp_path, synthetic_parquet_dir, ranks):
    """2 ranks: Ray Train restarts the worker group. 1 rank: the trial trains in its Tune process, so the kill
    fails the trial and Tune runs it again (tune.max_failures), from its CheckpointStore's latest epoch."""
    # Both only when asked: in every run, a killed rank's exact continuation is test_ddp's (two gloo ranks resumed
    # from rank 0's checkpoint of epoch 2, without Ray), Ray Train's restart of the worker group from the last
    # checkpoint test_two_nodes' (its lost node; `python -m ray_cifar.train`'s DDP path there too), and a killed
    # one-rank trial process the GPU check's ray dry run's (kill_resume). Each study here ~60 s on 2 busy cores.
    long_test("a killed rank: exact as test_ddp's resumed gloo ranks, restarted as test_two_nodes' lost node"
              if ranks > 1 else "a killed one-rank trial process, as the GPU check's kill_resume")
    # A one-rank trial's epochs on this tiny data take a fraction of a second each: with only EPOCHS, a quiet
    # machine can finish the trial between the test seeing epoch 2 and its kill.
    epochs = EPOCHS if ranks > 1 else 3 * EPOCHS
    sets = SETS + [f"train.epochs={epochs}"] + (ONE_RANK if ranks == 1 else [])
    # The undisturbed run is `python -m ray_cifar.train`: of one rank, one process without Ray (the same loop, so
    # the killed Tune trial must equal the plain run, and the suite is spared a Ray start); of two, its DDP path,
    # a study of one TorchTrainer trial.
    reference = study_args(synthetic_parquet_dir, tmp_path / "a", *sets)
    reference[reference.index("ray_cifar.tune")] = "ray_cifar.train"
    undisturbed = subprocess.run(reference, capture_output=True, text=True, timeout=900)
    assert undisturbed.returncode == 0, undisturbed.stdout[-3000:] + undisturbed.stderr[-3000:]
    if ranks > 1:  # DDP's `train` imports Ray after its console log began: Ray's lines are in the log once each
        (log,) = (tmp_path / "a" / console.LOGS).iterdir()
        assert log.read_text().count("Started a local Ray instance") == 1

    output = tmp_path / "b"
    proc = subprocess.Popen(study_args(synthetic_parquet_dir, output, *sets), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any(r["epoch"] >= 2 for r in ResultsLog(str(output)).read()), 600, "epoch 2", proc)
        workers = wait_for(lambda: rank_processes(proc.pid, ranks), 60, "the rank's process", proc)
        os.kill(workers[-1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=900)
    finally:
        end_tree(descendants(proc.pid) + [proc.pid] if proc.poll() is None else [])
    assert proc.returncode == 0, out[-4000:]

    trial = next(iter(trials_state(output).values()))
    assert trial["status"] == "completed"
    rows = sorted(ResultsLog(str(output)).read(), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # none lost, none twice
    resumed = [r for r in rows if r["resumed_from_epoch"]]
    assert resumed, "no epoch ran after a restart: the kill did not take effect"
    assert resumed[0]["resumed_from_epoch"] >= 2 and resumed[0]["epoch"] == resumed[0]["resumed_from_epoch"] + 1

    expected = sorted(ResultsLog(str(tmp_path / "a")).read(), key=lambda r: r["epoch"])
    assert [(r["epoch"], r["num_workers"], r["data_pipeline"]) for r in expected] == \
        [(r["epoch"], r["num_workers"], r["data_pipeline"]) for r in rows] == [(e, ranks, "torch")
                                                                               for e in range(1, epochs + 1)]
    for got, want in zip(rows, expected):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert abs(got[key] - want[key]) <= TOLERANCE, (got["epoch"], key, got[key], want[key])
    weights = final_state(output)["model"]
    reference = (final_state(tmp_path / "a") if ranks > 1
                 else checkpoint.load_state(str(tmp_path / "a" / "checkpoints" / "latest")))["model"]
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) <= TOLERANCE


def test_killed_driver_then_resume_finishes_the_study(tmp_path, synthetic_parquet_dir):
    output = tmp_path / "study"
    epochs = 8  # the third trial is killed after epoch 2: six epochs' margin (one is ~0.5 s) before it ends by itself
    # Hand-picked trials: two of one rank (they train in their Tune trial processes), one finished and one that
    # diverges, then the DDP trial whose Ray Train checkpoints are damaged below. A study of mixed rank counts.
    trials = ("[{optim.lr: 0.05, train.num_workers: 1}, {optim.lr: 1000000000.0, train.num_workers: 1}, "
              "{optim.lr: 0.03, train.num_workers: 2}]")
    sets = SETS + [f"train.epochs={epochs}", f"tune.search_space={{variants: {{grid: {trials}}}}}"]
    proc = subprocess.Popen(study_args(synthetic_parquet_dir, output, *sets), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    # Tune's grid generator's file is put back as it was before the third trial was made (a driver killed between
    # Tune's files): a generator that makes that trial again, or keeps the second's slot after it ended, fails here.
    grid_states = SearchStates(output, "basic-variant-state-*.json")

    def third_trial_running():
        grid_states.capture()
        trials = sorted(trials_state(output).values(), key=lambda t: t["trial_id"])
        return (len(trials) == 3 and [t["status"] for t in trials[:2]] == ["completed", "diverged"]
                and trials[2].get("epochs", 0) >= 2)

    before = kill_driver_when(proc, third_trial_running, "the third trial's second epoch",
                              lambda: {(r["trial_id"], r["epoch"]): r["time"] for r in ResultsLog(str(output)).read()})
    # The third (DDP) trial's checkpoints damaged while nothing runs, all but its oldest: whichever Ray hands the
    # resumed ranks as the latest (the one its run snapshot names; workers outlive a killed driver for a moment
    # and may have written newer ones that Ray never registered) is damaged, and the fallback is known.
    third = sorted(trials_state(output))[2]
    recorded = {(r["trial_id"], r["epoch"]) for r in ResultsLog(str(output)).read()}  # when the driver died
    folders = [f for f in sorted((output / "ray" / f"trial-{third}").glob("checkpoint_*")) if loads(f)]
    assert len(folders) >= 2, folders  # (a folder the kill cut short is not one)
    for folder in folders[1:]:
        with open(folder / checkpoint.STATE_FILE, "r+b") as f:
            f.truncate(os.path.getsize(folder / checkpoint.STATE_FILE) // 2)
    fallback = checkpoint.load_state(str(folders[0]))["epoch"]
    assert grid_states.put_back_an_older_one() >= 1

    resumed = subprocess.run([sys.executable, "-m", "ray_cifar.tune", "--resume", str(output)], capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "resuming study" in resumed.stdout
    warnings = [line for line in resumed.stdout.splitlines() if "warning: checkpoint" in line]
    assert len(warnings) == 1 and "damaged" in warnings[0] and f"{folders[0].name} (epoch {fallback})" in warnings[0], \
        warnings

    trials = sorted(trials_state(output).values(), key=lambda t: t["trial_id"])
    assert [t["status"] for t in trials] == ["completed", "diverged", "completed"]
    rows = ResultsLog(str(output)).read()
    keys = [(r["trial_id"], r["epoch"]) for r in rows]
    assert len(keys) == len(set(keys))
    by_trial = {t["trial_id"]: sorted(e for tid, e in keys if tid == t["trial_id"]) for t in trials}
    assert by_trial[trials[0]["trial_id"]] == by_trial[third] == list(range(1, epochs + 1))
    assert by_trial[trials[1]["trial_id"]] == [1]
    assert {r["trial_id"]: r["num_workers"] for r in rows} == {trials[0]["trial_id"]: 1, trials[1]["trial_id"]: 1,
                                                               third: 2}
    # The finished trials were not run again: their rows are the very rows written before the kill.
    for r in rows:
        if r["trial_id"] != third:
            assert before[(r["trial_id"], r["epoch"])] == r["time"]
    # The third trial went on from the oldest checkpoint (the epochs after it trained again, their rows kept once).
    assert {r["resumed_from_epoch"] for r in rows if r["trial_id"] == third and (third, r["epoch"]) not in recorded} \
        == {fallback}
    assert os.path.exists(output / "trials.parquet")
    # Each driver session's console has its own log in OUTPUT/logs; the killed one's holds what it printed.
    killed, resumed_log = (p.read_text() for p in sorted((output / console.LOGS).glob("driver-*.log")))
    assert killed.splitlines()[0].endswith(
        "python -m ray_cifar.tune " + shlex.join(study_args(synthetic_parquet_dir, output, *sets)[3:]))
    assert "(tune_trial pid=" in killed and f"epoch {epochs}/{epochs}" in killed  # the first trial's last epoch
    assert "resuming study" not in killed and resumed_log.splitlines()[0].endswith(f"--resume {output}")
    assert console.ANSI.sub("", warnings[0]) in resumed_log.splitlines() and "best trial" in resumed_log

    again = subprocess.run([sys.executable, "-m", "ray_cifar.tune", "--resume", str(output)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout


MADE_AFTER_EPOCHS = 6
MADE_AFTER_LRS = [0.05, 0.04, 0.03]


@pytest.fixture(scope="module")
def made_after_study(tmp_path_factory, synthetic_parquet_dir) -> dict:
    """The other way round from the study above: Tune's trial list is put back as it was before the second trial
    was made, the grid generator's state kept (it has made that trial). Tune's own generator never made the trial
    again: its grid point was never run and the study ended without it. It is made again under its id and goes
    on from its own checkpoint; the third is made after it.

    The study is tracked by MLflow (the tracker's kill and resume in every run; test_tracking's W&B study repeats
    it with RAY_CIFAR_LONG_TESTS=1): its second trial's run, opened by the killed driver, must be the one the
    remade trial logs its later epochs to, each step once."""
    pytest.importorskip("mlflow", reason="pip install 'ray_cifar[tracking]'")
    output = tmp_path_factory.mktemp("made_after") / "study"
    grid = f"{{optim.lr: {{grid: {MADE_AFTER_LRS}}}}}"
    proc = subprocess.Popen(study_args(synthetic_parquet_dir, output, *SETS, *ONE_RANK,
                                       f"train.epochs={MADE_AFTER_EPOCHS}", f"tune.search_space={grid}",
                                       "tune.tracking=mlflow"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lists = SearchStates(output, "experiment_state-*.json", kind="json")
    grids = SearchStates(output, "basic-variant-state-*.json")

    def second_trial_trained() -> bool:
        lists.capture()
        grids.capture()
        trials = sorted(trials_state(output).values(), key=lambda t: t["trial_id"])
        return (len(trials) == 2 and trials[1].get("epochs", 0) >= 2 and bool(grids.versions)
                and grids.made(grids.versions[-1]) == 2 and any(len(trial_ids(v[n])) == 1
                                                                for v in lists.versions for n in v))

    killed_at = kill_driver_when(proc, second_trial_trained, "the second trial's second epoch, its grid state saved",
                                 time.time)
    first, second = sorted(trials_state(output))
    version = lists.put_back_newest(lambda v: all(trial_ids(d) == {first} for d in v.values()),
                                    "with the first trial alone")
    grids.put_back_newest(lambda v: grids.made(v) == 2, "with two trials made")
    assert SearchStates(output).tune_trial_ids() == {first}, version.keys()
    recorded = {(r["trial_id"], r["epoch"]) for r in ResultsLog(str(output)).read()}
    assert (second, 2) in recorded

    resumed = subprocess.run([sys.executable, "-m", "ray_cifar.tune", "--resume", str(output)], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    return {"output": output, "first": first, "second": second, "recorded": recorded, "killed_at": killed_at,
            "stdout": resumed.stdout}


def test_a_trial_made_after_tunes_last_trial_list_is_made_again_by_resume_and_goes_on(made_after_study):
    output, first, second = made_after_study["output"], made_after_study["first"], made_after_study["second"]
    recorded, epochs = made_after_study["recorded"], MADE_AFTER_EPOCHS
    assert f"trial {second} was made after Tune's last saved trial list" in made_after_study["stdout"]
    trials = trials_state(output)
    assert len(trials) == 3 and {first, second} < set(trials), sorted(trials)
    assert [t["status"] for _, t in sorted(trials.items())] == ["completed"] * 3
    assert sorted(float(t["optim.lr"]) for t in trials.values()) == sorted(MADE_AFTER_LRS)
    rows = ResultsLog(str(output)).read()
    keys = [(r["trial_id"], r["epoch"]) for r in rows]
    assert sorted(keys) == sorted((t, e) for t in trials for e in range(1, epochs + 1))  # none lost, none twice
    # From its checkpoint, not anew. An epoch it trained and checkpointed as the driver died, but whose row the dead
    # driver never wrote, comes back from the checkpoint's history with its first report after the resume (as
    # trained then: resumed_from_epoch 0), before the epochs it trains anew (seen in CI: epoch 3 so, then 4-6).
    after = sorted((r for r in rows if r["trial_id"] == second and (second, r["epoch"]) not in recorded),
                   key=lambda r: r["epoch"])
    trained = [r for r in after if r["resumed_from_epoch"]]
    assert trained and trained[0]["resumed_from_epoch"] >= 2, after
    assert trained[0]["epoch"] == trained[0]["resumed_from_epoch"] + 1, after
    assert all(r["epoch"] <= trained[0]["resumed_from_epoch"] for r in after if not r["resumed_from_epoch"]), after


def test_mlflow_one_run_per_trial_every_epoch_once_after_a_killed_driver(made_after_study):
    from mlflow import MlflowClient

    from ray_cifar.results import read_rows
    from ray_cifar.tuning import tracking

    output, epochs = made_after_study["output"], MADE_AFTER_EPOCHS
    trials = trials_state(output)
    client = MlflowClient(f"sqlite:///{output}/mlflow.db")
    experiment = client.get_experiment_by_name(output.name)  # named after the output folder
    runs = client.search_runs([experiment.experiment_id])
    trial_runs = {r.data.tags[tracking.TRIAL_TAG]: r for r in runs if r.data.tags.get("ray_cifar.kind") == "trial"}
    study_runs = [r for r in runs if r.data.tags.get("ray_cifar.kind") == "study"]
    assert len(runs) == len(trial_runs) + 1 and len(study_runs) == 1  # no second run for a resumed or remade trial
    assert set(trial_runs) == set(trials)
    assert sorted(float(r.data.params["optim.lr"]) for r in trial_runs.values()) == sorted(MADE_AFTER_LRS)
    recorded = ResultsLog(str(output)).read()
    for trial_id, run in trial_runs.items():
        assert run.data.params["train.seed"] == "0"
        assert run.data.tags["mlflow.parentRunId"] == study_runs[0].info.run_id
        assert run.info.status == "FINISHED" and run.data.tags[tracking.STATUS_TAG] == "completed"
        assert run.data.metrics["best_epoch"] == trials[trial_id]["best_epoch"]  # its end figures
        history = client.get_metric_history(run.info.run_id, "val_acc")
        rows = {r["epoch"]: r for r in recorded if r["trial_id"] == trial_id}
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)) == sorted(rows)  # each epoch once
        assert all(abs(m.value - rows[m.step]["val_acc"]) < 1e-9 for m in history)
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == epochs
    # The second trial was interrupted by the kill after its epoch 1 was in MLflow: the killed driver logged its
    # first epochs, the resumed one (to the same run, the trial made again) the rest, skipping the steps the run
    # already held (each step once, above).
    history = client.get_metric_history(trial_runs[made_after_study["second"]].info.run_id, "val_acc")
    assert any(m.timestamp / 1000 < made_after_study["killed_at"] for m in history)
    table = {t["trial_id"]: t for t in read_rows(str(output / "trials.parquet"))}
    tested = [t for t, row in table.items() if row["test_acc"] is not None]
    assert tested and all(trial_runs[t].data.metrics["test_acc"] == table[t]["test_acc"] for t in tested)
    assert study_runs[0].data.params["train.epochs"] == str(epochs)  # the study's config
    attached = {f.path for f in client.list_artifacts(study_runs[0].info.run_id)}
    assert {"trials.parquet", "results.parquet", "report.html", "report.md", "figures"} <= attached
    figures = {os.path.basename(f.path) for f in client.list_artifacts(study_runs[0].info.run_id, "figures")}
    assert "ranking.png" in figures  # the report's images, beside it as it links them
    assert os.path.isdir(output / tracking.MLFLOW_ARTIFACTS)  # the default store's artifacts stay under OUTPUT


def test_a_ddp_trial_whose_ray_train_snapshot_the_kill_emptied_resumes_from_its_checkpoints(tmp_path,
                                                                                          synthetic_parquet_dir):
    """Ray Train rewrites a run's list of checkpoints (checkpoint_manager_snapshot.json) in place after each report;
    a driver killed mid-write left it empty (seen in CI), and the resumed trial failed for good on it. Now it is set
    aside with one line and the trial goes on from its newest checkpoint that loads."""
    long_test("an emptied Ray Train run list: its set-aside in test_damage, a killed DDP driver's resume above")
    output = tmp_path / "study"
    epochs = 8
    proc = subprocess.Popen(study_args(synthetic_parquet_dir, output, *SETS, f"train.epochs={epochs}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    kill_driver_when(proc, lambda: any(r["epoch"] >= 2 for r in ResultsLog(str(output)).read()), "epoch 2")
    (trial_id,) = trials_state(output)
    snapshot = output / "ray" / f"trial-{trial_id}" / "checkpoint_manager_snapshot.json"
    assert snapshot.exists()
    snapshot.write_bytes(b"")  # what the kill mid-write leaves

    resumed = subprocess.run([sys.executable, "-m", "ray_cifar.tune", "--resume", str(output)], capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert resumed.stdout.count("checkpoint_manager_snapshot.json) was damaged") == 1, resumed.stdout[-4000:]
    assert (snapshot.parent / "checkpoint_manager_snapshot.json.damaged").exists()
    rows = sorted(ResultsLog(str(output)).read(), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # none lost, none twice
    assert min(r["resumed_from_epoch"] for r in rows if r["resumed_from_epoch"]) >= 2  # from a checkpoint, not anew
    assert trials_state(output)[trial_id]["status"] == "completed"


def test_a_study_killed_before_its_first_trial_is_started_by_its_retried_command_line(tmp_path, synthetic_parquet_dir):
    """A driver killed in its first seconds (config.yaml written, Ray starting, no Tune experiment yet) left a folder
    that neither a new run (not empty) nor --resume (no experiment) would take, so a retried job failed for good;
    its command line with --resume-if-exists (a KubeRay RayJob's) starts the study from its config.yaml."""
    output = tmp_path / "study"
    args = study_args(synthetic_parquet_dir, output, *SETS, *ONE_RANK, "train.epochs=2")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_driver_when(proc, lambda: (output / "config.yaml").exists(), "config.yaml")
    assert not list(output.glob("ray/tune/experiment_state-*.json")), "killed after Tune began: nothing tested here"

    again = subprocess.run(args + ["--resume-if-exists"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "was stopped before its first trial" in again.stdout and "starting it" in again.stdout
    (trial,) = trials_state(output).values()
    assert trial["status"] == "completed"
    assert sorted(r["epoch"] for r in ResultsLog(str(output)).read()) == [1, 2]


def test_resume_of_a_folder_that_is_not_a_study_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ray_cifar.tune", "--resume", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "not a ray_cifar study" in result.stderr
