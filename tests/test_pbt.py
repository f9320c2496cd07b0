"""PBT/PB2 decisions, explore bounds, restore, the lineage a trial starts from, and the search-space
translation for each tune.search: fake trials and synthetic results, no training (as Ray tests its
schedulers), plus the real searcher libraries asked for a suggestion."""

from __future__ import annotations

import math
import pickle
import random
import subprocess
import sys

import pytest
import torch
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from conftest import TINY_MODEL
from ray_cifar import checkpoint
from ray_cifar.tuning import lineage, pbt, searchers
from ray_cifar.config import LINEAGE, ConfigError, encode_choice, split_sampled
from ray_cifar.results import ResultsLog
from ray_cifar.validation import load_config, trial_config

SPACE = ("tune.search_space={optim.lr: {grid: [0.00001, 0.05]}, optim.weight_decay: {loguniform: [0.0001, 0.001]}, "
         "optim.momentum: {choice: [0.8, 0.9, 0.95]}, train.seed: {grid: [0, 1]}}")


def pbt_config(*sets: str):
    return load_config(None, [*TINY_MODEL, "tune.scheduler=pbt", SPACE, "train.epochs=6", *sets])


class FakeController:
    """What PBT asks of Tune's controller: the trials, pausing one, saving the experiment."""

    search_alg = None

    def __init__(self, trials):
        self.trials, self.paused, self.saved = trials, [], 0

    def get_trials(self):
        return self.trials

    def get_live_trials(self):
        return [t for t in self.trials if not t.is_finished()]

    def pause_trial(self, trial, should_checkpoint=True):
        assert not should_checkpoint  # trials checkpoint themselves every epoch
        self.paused.append(trial.trial_id)
        trial.set_status(Trial.PAUSED)

    def checkpoint(self, force=False, wait=False):
        self.saved += 1


def make_population(cfg, output, n=4, **pbt_args):
    scheduler = pbt.create_pbt(cfg, str(output), **pbt_args)
    scheduler.set_search_properties("val_acc", "max")
    trials = []
    for i in range(n):
        t = Trial("__fake", config={"optim.lr": 0.05, "optim.weight_decay": 5e-4, "optim.momentum": 0.9,
                                    "train.seed": i}, stub=True, trial_id=f"t{i}")
        t.set_status(Trial.RUNNING)
        trials.append(t)
    controller = FakeController(trials)
    for t in trials:
        scheduler.on_trial_add(controller, t)
    assert controller.saved == n  # each added trial is on disk at once
    controller.saved = 0
    return scheduler, controller, trials


def report(scheduler, controller, trial, epoch, val_acc, epochs=6):
    result = {"epoch": epoch, "epochs": epochs, "val_acc": val_acc, "training_iteration": epoch}
    decision = scheduler.on_trial_result(controller, trial, result)
    trial.run_metadata.last_result = result
    return decision


def test_the_bottom_trial_copies_a_top_one_and_explores_within_bounds(tmp_path):
    random.seed(0)
    cfg = pbt_config("tune.perturbation_interval=2", "tune.pbt_mutate=[optim.weight_decay, optim.momentum]")
    scheduler, controller, trials = make_population(cfg, tmp_path)
    trials[2].config["optim.lr"] = 0.02
    for t, acc in zip(trials, (0.5, 0.6, 0.7, 0.1)):
        assert report(scheduler, controller, t, 1, acc) == TrialScheduler.CONTINUE  # before the interval
    for t, acc in zip(trials, (0.5, 0.6, 0.7)):
        report(scheduler, controller, t, 2, acc)
    report(scheduler, controller, trials[3], 2, 0.1)
    assert controller.paused == ["t3"] and controller.saved == 1
    weak, donor = trials[3], trials[2]
    lineage = weak.config[LINEAGE]
    assert lineage == {"generation": 1, "parent": "t2", "parent_generation": 0}
    assert weak.config["train.seed"] == 3  # its own seed, not the donor's
    assert 1e-4 <= weak.config["optim.weight_decay"] <= 1e-3
    assert weak.config["optim.momentum"] in (0.8, 0.9, 0.95)
    assert weak.config["optim.lr"] == donor.config["optim.lr"] == 0.02  # not mutated: the donor's value
    # The new config is a trial config ray_cifar accepts: the lineage is not a field.
    cfg = trial_config(load_config(None, TINY_MODEL).to_dict(), weak.config)
    assert cfg.optim.weight_decay == weak.config["optim.weight_decay"]
    assert split_sampled(weak.config)[1]["parent"] == "t2"


def test_no_exploit_from_a_donor_behind_nor_at_the_last_epoch(tmp_path):
    scheduler, controller, trials = make_population(pbt_config("tune.perturbation_interval=1",
                                                               "tune.pbt_quantile=0.5"), tmp_path)
    report(scheduler, controller, trials[0], 1, 0.9)
    report(scheduler, controller, trials[0], 2, 0.9)
    report(scheduler, controller, trials[2], 3, 0.1)  # the top trial is at epoch 2: no donor has epoch 3
    assert controller.paused == []
    report(scheduler, controller, trials[1], 6, 0.0)  # its last epoch: nothing left to train
    assert controller.paused == []
    report(scheduler, controller, trials[3], 2, 0.05)  # a donor at its epoch: it exploits
    assert controller.paused == ["t3"]


def test_a_weak_member_first_at_its_decision_epoch_waits_for_the_donor_then_copies_it(tmp_path, capsys):
    """Ray uses up a member's interval before it looks for a donor: two members trained side by side, the weak one
    reporting its decision epoch first found none there, and the decision was lost (an audited smoke study: no
    exploit at all). It waits, paused (also when every member runs at once), until the donor reaches the epoch."""
    random.seed(0)
    cfg = pbt_config("tune.perturbation_interval=2", "tune.pbt_quantile=0.5", "tune.pbt_mutate=[optim.weight_decay]")
    scheduler, controller, (strong, weak) = make_population(cfg, tmp_path, n=2, all_at_once=True)
    report(scheduler, controller, strong, 1, 0.5)
    report(scheduler, controller, weak, 1, 0.4)
    assert report(scheduler, controller, weak, 2, 0.45) == TrialScheduler.PAUSE  # the strong one is at epoch 1
    assert "pbt: trial t1 waits at epoch 2 for a donor to reach it (t0 is at epoch 1)" in capsys.readouterr().out
    weak.set_status(Trial.PAUSED)  # as Tune pauses it
    assert controller.paused == [] and scheduler.choose_trial_to_run(controller) is None
    # The donor goes on (a paused member does not stop it when all run at once), and reaching epoch 2 it gives.
    assert report(scheduler, controller, strong, 2, 0.6) == TrialScheduler.CONTINUE
    assert controller.paused == ["t1"] and weak.config[LINEAGE] == {"generation": 1, "parent": "t0",
                                                                     "parent_generation": 0}
    assert "trial t1 (val_acc 0.4500 at epoch 2) copies t0 (0.6000)" in capsys.readouterr().out
    assert scheduler.choose_trial_to_run(controller) is weak and controller.saved == 1
    # A donor at the epoch already: the exploit at once, as before (no wait).
    weak.set_status(Trial.RUNNING)
    report(scheduler, controller, strong, 3, 0.7)
    report(scheduler, controller, strong, 4, 0.8)
    assert report(scheduler, controller, weak, 4, 0.5) == TrialScheduler.NOOP  # Ray's answer to an exploit
    assert controller.paused == ["t1", "t1"] and "waits" not in capsys.readouterr().out


def test_a_waiting_member_goes_on_alone_when_no_longer_lower_or_when_its_donor_ends(tmp_path, capsys):
    cfg = pbt_config("tune.perturbation_interval=2", "tune.pbt_quantile=0.34")  # one member of three each way
    scheduler, controller, (strong, middle, weak) = make_population(cfg, tmp_path, n=3, all_at_once=True)
    for t, acc in zip((strong, middle, weak), (0.6, 0.5, 0.4)):
        report(scheduler, controller, t, 1, acc)
    assert report(scheduler, controller, weak, 2, 0.45) == TrialScheduler.PAUSE
    weak.set_status(Trial.PAUSED)
    # The middle member reaches epoch 2 below it: the weak one is not in the lower quantile now, and goes on
    # (from its own checkpoint: no exploit); the middle one waits for the strong one in turn.
    assert report(scheduler, controller, middle, 2, 0.3) == TrialScheduler.PAUSE
    middle.set_status(Trial.PAUSED)
    out = capsys.readouterr().out
    assert "trial t2 goes on from epoch 2 without a donor (no longer in the lower quantile)" in out
    assert "trial t1 waits at epoch 2 for a donor to reach it (t0 is at epoch 1)" in out
    assert scheduler.choose_trial_to_run(controller) is weak
    weak.set_status(Trial.RUNNING)
    # The strong member ends (stopped early) before it reaches epoch 2: the middle one waits no more.
    scheduler.on_trial_complete(controller, strong, {"epoch": 1, "epochs": 6, "val_acc": 0.6})
    strong.set_status(Trial.TERMINATED)
    assert "trial t1 goes on from epoch 2 without a donor (no donor can reach its epoch)" in capsys.readouterr().out
    assert scheduler.choose_trial_to_run(controller) is middle
    assert controller.paused == [] and all(LINEAGE not in t.config for t in (strong, middle, weak))


def test_no_wait_for_a_donor_that_cannot_give_and_none_survives_a_failure_or_a_restore(tmp_path):
    cfg = pbt_config("tune.perturbation_interval=2", "tune.pbt_quantile=0.5")
    scheduler, controller, (strong, weak) = make_population(cfg, tmp_path, n=2)
    report(scheduler, controller, strong, 1, 0.5, epochs=2)  # it ends at the weak one's decision epoch
    report(scheduler, controller, weak, 1, 0.4)
    assert report(scheduler, controller, weak, 2, 0.45) == TrialScheduler.CONTINUE and not scheduler._waiting()

    scheduler, controller, (strong, weak) = make_population(cfg, tmp_path, n=2)
    report(scheduler, controller, strong, 1, 0.5)
    report(scheduler, controller, weak, 1, 0.4)
    assert report(scheduler, controller, weak, 2, 0.45) == TrialScheduler.PAUSE
    weak.set_status(Trial.PAUSED)
    assert scheduler.__getstate__()["_waits"] == {}  # a restored copy: the waiting member comes back and runs on
    # The donor fails: the waiting member goes on alone.
    scheduler.on_trial_error(controller, strong)
    strong.set_status(Trial.ERROR)
    assert not scheduler._waiting() and scheduler.choose_trial_to_run(controller) is weak
    assert controller.paused == []

    # A scheduler pickled before members could wait (a study saved then, restored now) has no waiting set.
    old = pickle.loads(pickle.dumps(pbt.create_pbt(cfg, str(tmp_path))))
    del old.__dict__["_waits"]
    old.set_search_properties("val_acc", "max")
    strong, weak = (Trial("__fake", config={"train.seed": i}, stub=True, trial_id=f"u{i}") for i in range(2))
    controller = FakeController([strong, weak])
    for t in (strong, weak):
        t.set_status(Trial.PAUSED)
        old.on_trial_add(controller, t)
    assert old.choose_trial_to_run(controller) is strong
    strong.set_status(Trial.RUNNING)
    weak.set_status(Trial.RUNNING)
    report(old, controller, strong, 1, 0.5)
    report(old, controller, weak, 1, 0.4)
    assert report(old, controller, weak, 2, 0.45) == TrialScheduler.PAUSE


def test_explore_keeps_every_value_in_its_range():
    cfg = pbt_config("tune.pbt_resample_p=0.3", "tune.search_space={optim.weight_decay: {uniform: [0.0001, 0.001]}, "
                     "data.cutout_size: {randint: [0, 8]}, data.erasing_p: {uniform: [0.0, 1.0]}}")
    limits = pbt.bounds(cfg)
    assert limits == {"optim.weight_decay": (1e-4, 1e-3), "data.cutout_size": (0, 8), "data.erasing_p": (0.0, 1.0)}
    from ray.tune.schedulers.pbt import _explore

    random.seed(0)
    config = {"optim.weight_decay": 1e-3, "data.cutout_size": 8, "data.erasing_p": 0.95}
    for _ in range(300):
        config = lineage.clip(_explore(config, pbt.mutations(cfg), 0.3, (1.2, 0.8), None)[0], limits)
        assert 1e-4 <= config["optim.weight_decay"] <= 1e-3 and 0 <= config["data.erasing_p"] <= 1
        assert isinstance(config["data.cutout_size"], int) and 0 <= config["data.cutout_size"] <= 8


def test_a_restored_scheduler_takes_each_trials_last_score_from_the_rows(tmp_path):
    log = ResultsLog(str(tmp_path))
    log.append([{"trial_id": f"t{i}", "epoch": e, "val_acc": 0.1 * i + 0.01 * e, "time": e}
                for i in range(4) for e in (1, 2, 3)])
    cfg = pbt_config("tune.perturbation_interval=2")
    restored = pickle.loads(pickle.dumps(pbt.create_pbt(cfg, str(tmp_path))))
    restored.set_search_properties("val_acc", "max")
    trials = [Trial("__fake", config={"train.seed": i, "optim.lr": 0.05, "optim.weight_decay": 5e-4,
                                      "optim.momentum": 0.9}, stub=True, trial_id=f"t{i}") for i in range(4)]
    controller = FakeController(trials)
    for t in trials:
        t.set_status(Trial.RUNNING)
        restored.on_trial_add(controller, t)
    state = restored._trial_state[trials[1]]
    assert math.isclose(state.last_score, 0.13) and state.last_train_time == 3 and state.last_perturbation_time == 2
    # At once a population to compare with: the weakest exploits at its next decision epoch.
    for t in trials[1:]:
        t.run_metadata.last_result = {"epoch": 4}
    report(restored, controller, trials[0], 4, 0.0)
    assert controller.paused == ["t0"] and trials[0].config[LINEAGE]["parent"] == "t3"


def test_a_members_old_generations_keep_only_its_best_checkpoint(tmp_path):
    """Every exploit starts a run folder of its own; the ones before keep the checkpoint of the member's best
    epoch (all generations, as the study ranks them) and nothing else, once the new generation has reported."""
    storage = tmp_path / "ray"

    def run(name, *epochs):
        for e in epochs:
            (storage / name / f"checkpoint_{e:06d}").mkdir(parents=True)
            (storage / name / f"checkpoint_{e:06d}" / "state.pt").write_bytes(b"x")
        (storage / name / "checkpoint_manager_snapshot.json").write_text("{}")  # a DDP run's own file
        return {e: str(storage / name / f"checkpoint_{e:06d}") for e in epochs}

    def left():
        return {p.name: sorted(c.name for c in p.iterdir()) for p in storage.iterdir()}

    def result(epoch, val_acc, generation, checkpoint_path, **more):
        return {"epoch": epoch, "epochs": 9, "val_acc": val_acc, "training_iteration": epoch,
                "pbt_generation": generation, "checkpoint_path": checkpoint_path, **more}

    g0, g1, g2 = run("trial-t0", 1, 2), run("trial-t0-g1", 3, 4), run("trial-t0-g2", 5)
    run("trial-t1", 1)  # another member: not this member's to delete
    (storage / "trial-t0-g1.donor").mkdir()  # a stale copy: the generation has checkpoints of its own
    cfg = pbt_config("tune.perturbation_interval=100")  # no decisions: the disk alone
    scheduler = pbt.create_pbt(cfg, str(tmp_path), storage_path=str(storage))
    scheduler.set_search_properties("val_acc", "max")
    t0 = Trial("__fake", config={"train.seed": 0}, stub=True, trial_id="t0")
    controller = FakeController([t0])
    scheduler.on_trial_add(controller, t0)
    t0.set_status(Trial.RUNNING)
    for epoch, acc in ((1, 0.5), (2, 0.6)):
        scheduler.on_trial_result(controller, t0, result(epoch, acc, 0, g0[epoch]))
    assert len(left()) == 5  # generation 0 is the member's only one
    scheduler.on_trial_result(controller, t0, result(3, 0.55, 1, g1[3]))
    # Generation 1 reported: generation 0 keeps its epoch 2, the member's best so far, alone.
    assert left()["trial-t0"] == ["checkpoint_000002"] and "trial-t0-g1.donor" in left()
    scheduler.on_trial_result(controller, t0, result(4, 0.7, 1, g1[4]))  # the best moves to generation 1
    assert "trial-t0" not in left()
    scheduler.on_trial_result(controller, t0, result(5, 0.1, 2, g2[5]))
    assert left()["trial-t0-g1"] == ["checkpoint_000004"] and "trial-t0-g1.donor" not in left()
    assert len(left()["trial-t0-g2"]) == 2  # the member's current generation
    assert left()["trial-t1"] == ["checkpoint_000001", "checkpoint_manager_snapshot.json"]

    # A restored scheduler takes the best from the rows; a best whose checkpoint is unknown keeps its whole folder.
    ResultsLog(str(tmp_path)).append([{"trial_id": "t0", "epoch": 4, "val_acc": 0.7, "time": 4, "pbt_generation": 1,
                                       "checkpoint_path": None},
                                      {"trial_id": "t0", "epoch": 5, "val_acc": 0.1, "time": 5, "pbt_generation": 2,
                                       "checkpoint_path": g2[5]}])
    run("trial-t0-g1", 3)
    restored = pickle.loads(pickle.dumps(pbt.create_pbt(cfg, str(tmp_path), storage_path=str(storage))))
    restored.set_search_properties("val_acc", "max")
    restored.on_trial_add(controller, t0)
    restored.on_trial_result(controller, t0, result(6, 0.2, 2, str(storage / "trial-t0-g2" / "checkpoint_000006")))
    assert left()["trial-t0-g1"] == ["checkpoint_000003", "checkpoint_000004", "checkpoint_manager_snapshot.json"]
    # A resumed run's first report carries its checkpoint's epochs (its own generation's): one is the best now.
    history = [{"epoch": 6, "val_acc": 0.9}]
    restored.on_trial_result(controller, t0, result(7, 0.2, 3, str(storage / "trial-t0-g3" / "ck"), history=history))
    assert sorted(left()) == ["trial-t1"]


def test_pb2_takes_ranges_only_and_pbt_refuses_what_cannot_change_mid_run():
    with pytest.raises(ConfigError, match="PB2 perturbs ranges only"):
        pbt_config("tune.scheduler=pb2")
    cfg = pbt_config("tune.scheduler=pb2", "tune.pbt_mutate=[optim.weight_decay]")
    assert pbt.pb2_bounds(cfg) == {"optim.weight_decay": [1e-4, 1e-3]}
    with pytest.raises(ConfigError, match="cannot change in a running training state"):
        load_config(None, [*TINY_MODEL, "tune.scheduler=pbt", "tune.pbt_mutate=[model.widths]",
                           "tune.search_space={model.widths: {grid: [[8, 16], [16, 32]]}}"])
    with pytest.raises(ConfigError, match="needs a searched field it can perturb"):
        load_config(None, [*TINY_MODEL, "tune.scheduler=pbt", "tune.search_space={train.global_batch_size: "
                                                                  "{grid: [50, 100]}}"])
    with pytest.raises(ConfigError, match="evolves one population"):
        pbt_config("tune.search=optuna", "tune.search_space={optim.lr: {loguniform: [0.001, 0.1]}}")


def test_restore_keeps_the_configs_hyperparameters_over_the_donors_state():
    """PBT's exploit: the donor's weights, optimizer moments, Lookahead slow weights and schedule step; this
    trial's lr (the schedule's new peak), weight decay and momentum from the next step on."""
    from ray_cifar.loop import build_model
    from ray_cifar.optim import create_optimizer, create_scheduler

    def run(*sets):
        cfg = load_config(None, [*TINY_MODEL, "optim.lookahead_k=2", "schedule.name=cosine", *sets])
        model = build_model(cfg, torch.device("cpu"))
        optimizer = create_optimizer(model, cfg.optim)
        return cfg, model, optimizer, create_scheduler(optimizer, cfg.schedule, cfg.optim.lr, 10, 100)

    _, model, optimizer, scheduler = run("optim.lr=0.1", "optim.weight_decay=0.0005", "optim.momentum=0.9")
    for _ in range(7):
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
        scheduler.step()
    donor = checkpoint.training_state(model, optimizer, scheduler, None, epoch=1, step=7, best={}, history=[],
                                      config={})
    cfg, model2, optimizer2, scheduler2 = run("optim.lr=0.4", "optim.weight_decay=0.001", "optim.momentum=0.8",
                                              "train.seed=5")
    checkpoint.restore(donor, model2, optimizer2, scheduler2, None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    group = optimizer2.param_groups[0]
    assert (group["weight_decay"], group["momentum"]) == (0.001, 0.8)
    assert scheduler2.last_epoch == 7
    multiplier = scheduler.lr_lambdas[0](7)
    assert math.isclose(group["lr"], 0.4 * multiplier) and math.isclose(scheduler2.get_last_lr()[0], 0.4 * multiplier)
    slow = optimizer.state_dict()["slow"]
    assert all(torch.equal(a, b) for a, b in zip(slow, optimizer2.state_dict()["slow"]))
    scheduler2.step()
    assert math.isclose(optimizer2.param_groups[0]["lr"], 0.4 * scheduler.lr_lambdas[0](8))


def test_the_donor_copy_leaves_epochs_to_train(tmp_path):
    """The donor's results reach the driver late: when the exploit is decided the donor may be at its last epoch
    on disk (seen with fast 2-rank DDP members: the copy was its finished state, and the member trained nothing
    more). The copy is the donor's newest state before its last epoch; none there, no copy (no exploit)."""
    from ray_cifar.tuning import trial

    for epoch, stamp in ((2, "10-00-00"), (3, "10-05-00")):  # a DDP donor of 3 epochs, finished on disk
        checkpoint.save_state({"epoch": epoch, "history": [], "best": {"value": 1, "epoch": epoch}},
                              str(tmp_path / "trial-e" / f"checkpoint_2026-01-01_{stamp}.000001"))
    lineage = {"trial_id": "t", "generation": 1, "parent": "e", "parent_generation": 0}
    assert trial.copy_donor_state(str(tmp_path), "t", lineage, epochs=3)
    assert trial.adopted_state(trial.donor_location(str(tmp_path), "t", 1))["epoch"] == 2
    assert trial.copy_donor_state(str(tmp_path), "u", {**lineage, "trial_id": "u"}, epochs=None)  # no bound: newest
    assert trial.adopted_state(trial.donor_location(str(tmp_path), "u", 1))["epoch"] == 3
    assert not trial.copy_donor_state(str(tmp_path), "v", {**lineage, "trial_id": "v"}, epochs=2)  # only finished


def test_a_generation_starts_from_the_donors_newest_checkpoint(tmp_path):
    from ray_cifar.tuning import trial

    def save(run, folder, epoch):
        checkpoint.save_state({"epoch": epoch, "history": [{"epoch": epoch}], "best": {"value": 1, "epoch": epoch}},
                              str(tmp_path / run / folder))

    save("trial-d-g1", "checkpoint_000002", 2)
    save("trial-d-g1", "checkpoint_000003", 3)
    save("trial-e", "checkpoint_2026-01-01_10-00-00.000001", 1)  # Ray Train's names (a DDP donor)
    save("trial-e", "checkpoint_2026-01-01_10-05-00.000001", 2)
    lineage = {"trial_id": "t", "generation": 1, "parent": "d", "parent_generation": 1}
    location = trial.donor_copy(str(tmp_path), trial.trainer_name("t", 1), lineage)
    assert location.endswith("trial-t-g1.donor")
    state = trial.adopted_state(location)
    assert state["epoch"] == 3 and state["history"] == [] and state["best"] == {"value": None, "epoch": None}
    # Made once: a retry of this generation starts from the same copy, though the donor moved on.
    save("trial-d-g1", "checkpoint_000004", 4)
    assert trial.adopted_state(trial.donor_copy(str(tmp_path), trial.trainer_name("t", 1), lineage))["epoch"] == 3
    ddp = {"trial_id": "u", "generation": 2, "parent": "e", "parent_generation": 0}
    assert trial.adopted_state(trial.donor_copy(str(tmp_path), trial.trainer_name("u", 2), ddp))["epoch"] == 2
    assert trial.donor_copy(str(tmp_path), trial.trainer_name("v"), {"trial_id": "v"}) is None
    # Once the generation has a checkpoint of its own (whose save deletes the copy), it resumes from that: no copy.
    save("trial-t-g1", "checkpoint_000004", 4)
    from ray_cifar.checkpoint_store import remove_state_at

    remove_state_at(location)
    assert trial.donor_copy(str(tmp_path), trial.trainer_name("t", 1), lineage) is None
    assert not (tmp_path / "trial-t-g1.donor").exists()


# -- search-space translation -------------------------------------------------------------------

SEARCHED = ("tune.search_space={optim: {grid: [{name: sgd, lr: 0.1}, {name: adam, lr: 0.001}]}, "
            "train.global_batch_size: {grid: [50, 100]}, optim.weight_decay: {loguniform: [0.00001, 0.001]}, "
            "data.cutout_size: {randint: [0, 8]}, model.norm: {choice: [batch, group]}}")


def test_each_search_maps_the_search_space_language():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = load_config(None, [*TINY_MODEL, SEARCHED])
    grid = searchers.param_space(cfg.tune.search_space, "grid")
    assert grid["train.global_batch_size"] == tune.grid_search([50, 100])
    random_space = searchers.param_space(cfg.tune.search_space, "random")
    assert isinstance(random_space["train.global_batch_size"], Categorical)
    assert random_space["optim"].categories[0] == {"name": "sgd", "lr": 0.1}  # Tune's generator takes dicts
    model_based = searchers.param_space(cfg.tune.search_space, "optuna")
    assert model_based["optim"].categories == [encode_choice({"name": "sgd", "lr": 0.1}),
                                               encode_choice({"name": "adam", "lr": 0.001})]
    assert all(isinstance(c, str) for c in model_based["optim"].categories)
    assert isinstance(model_based["optim.weight_decay"], Float) and isinstance(model_based["data.cutout_size"], Integer)
    assert model_based["data.cutout_size"].upper == 9  # randint [0, 8] is inclusive; Tune's upper bound is not
    values, lineage = split_sampled({"optim": model_based["optim"].categories[1], LINEAGE: {"generation": 2}})
    assert values == {"optim": {"name": "adam", "lr": 0.001}} and lineage == {"generation": 2}


@pytest.mark.parametrize("search", ["optuna", "hyperopt", "bohb"])
def test_each_searcher_suggests_configs_ray_cifar_accepts(search):
    cfg = load_config(None, [*TINY_MODEL, SEARCHED, f"tune.search={search}", "tune.num_samples=5"])
    searcher = searchers.create_search_alg(cfg)
    space = searchers.param_space(cfg.tune.search_space, search)
    assert searcher.set_search_properties("val_acc", "max", space)
    base = cfg.to_dict()
    base["tune"]["search_space"] = {}
    for i in range(5):
        suggested = searcher.suggest(f"s{i}")
        trial = trial_config(base, suggested)  # decoded and valid
        assert trial.optim.name in ("sgd", "adam") and 1e-5 <= trial.optim.weight_decay <= 1e-3
        assert trial.train.global_batch_size in (50, 100) and 0 <= trial.data.cutout_size <= 8
        assert type(trial.data.cutout_size) is int
        searcher.on_trial_complete(f"s{i}", {"val_acc": 0.1 * i, "epoch": 1, "training_iteration": 1})


def test_what_a_searcher_cannot_mean_is_one_line():
    with pytest.raises(ConfigError, match="would tune the seed"):
        load_config(None, [*TINY_MODEL, "tune.search=optuna", "tune.search_space={train.seed: {grid: [0, 1]}}"])
    with pytest.raises(ConfigError, match="tune.search: unknown 'smac'"):
        load_config(None, [*TINY_MODEL, "tune.search=smac"])


def test_a_missing_library_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("hpbandster", "sklearn")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"tune.search: bohb needs hpbandster, which is not installed: "
                                          r"pip install 'ray_cifar\[search\]'"):
        load_config(None, [*TINY_MODEL, "tune.search=bohb"])
    with pytest.raises(ConfigError, match=r"tune.scheduler: pb2 needs sklearn"):
        load_config(None, [*TINY_MODEL, "tune.scheduler=pb2", "tune.search_space={optim.lr: {loguniform: [0.01, 0.1]}}"])


def test_pb2s_data_comes_back_from_the_rows_after_a_restore(tmp_path):
    """An uninterrupted PB2 over fake trials; each result recorded as the recorder writes it; a restored PB2
    (Ray's restore: a fresh copy) rebuilt from those rows holds the same table its GP learns from."""
    random.seed(0)
    cfg = pbt_config("tune.scheduler=pb2", "tune.pbt_mutate=[optim.weight_decay]", "tune.perturbation_interval=1",
                     "tune.pbt_quantile=0.25")
    scheduler, controller, trials = make_population(cfg, tmp_path)
    base = {t.trial_id: 0.1 * i for i, t in enumerate(trials)}
    epoch, resumed, rows = {t.trial_id: 0 for t in trials}, {t.trial_id: 0 for t in trials}, []
    for _ in range(5):
        for t in reversed(trials):  # the strongest first: donors have reached the weak ones' epoch
            tid, e = t.trial_id, epoch[t.trial_id] + 1
            acc, lineage = base[tid] + 0.01 * e * (1 + int(tid[1:])), t.config.get(LINEAGE) or {}
            rows.append({"trial_id": tid, "epoch": e, "epochs": 6, "val_acc": acc, "time": float(len(rows)),
                         "optim.weight_decay": t.config["optim.weight_decay"], "resumed_from_epoch": resumed[tid],
                         "pbt_generation": lineage.get("generation", 0), "pbt_parent": lineage.get("parent", "")})
            exploits = len(controller.paused)
            report(scheduler, controller, t, e, acc)
            epoch[tid] = e
            if len(controller.paused) > exploits:  # it copies its donor's state: it goes on from there
                donor = t.config[LINEAGE]["parent"]
                epoch[tid] = resumed[tid] = epoch[donor]
                base[tid] = base[donor]
                t.set_status(Trial.RUNNING)
    assert len(controller.paused) >= 2 and len(scheduler.data) > len(rows) - 4  # exploits, and their entries
    ResultsLog(str(tmp_path)).append(rows)
    restored = pickle.loads(pickle.dumps(pbt.create_pbt(cfg, str(tmp_path))))
    restored.set_search_properties("val_acc", "max")
    assert restored.data.empty
    for t in trials:
        restored.on_trial_add(FakeController(trials), t)
    restored.choose_trial_to_run(FakeController(trials))  # Tune's first question after adding them all

    def table(data):
        return sorted(tuple(round(v, 9) if isinstance(v, float) else v for v in row)
                      for row in data[["Trial", "Time", "optim.weight_decay", "Reward"]].itertuples(index=False))

    assert table(restored.data) == table(scheduler.data)

    # A study saved when RestorablePB2 lived in ray_cifar.tuning.pbt still unpickles (the names have one length).
    saved = pickle.dumps(pbt.create_pbt(cfg, str(tmp_path)))
    assert b"ray_cifar.tuning.pb2" in saved
    assert type(pickle.loads(saved.replace(b"ray_cifar.tuning.pb2", b"ray_cifar.tuning.pbt"))).label == "pb2"


def test_a_driver_imports_scikit_learn_only_for_pb2():
    """Ray's PB2 module imports scikit-learn and SciPy (~1 s of a driver's start): only a PB2 study loads it."""
    code = ("import sys; from ray_cifar.tuning import study, pbt; from ray_cifar.validation import load_config; "
            f"cfg = load_config(None, {TINY_MODEL!r} + ['tune.scheduler=pbt', "
            "'tune.search_space={optim.lr: {loguniform: [0.01, 0.1]}}']); pbt.create_pbt(cfg, '.'); "
            "assert 'sklearn' not in sys.modules, 'pbt'; cfg.tune.scheduler = 'pb2'; pbt.create_pbt(cfg, '.'); "
            "assert 'sklearn' in sys.modules, 'pb2'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_population_larger_than_the_trials_at_once_is_created_whole_and_bohb_on_steps_needs_its_budget():
    from ray_cifar.tuning.study import _trials_at_once

    cfg = pbt_config()  # 2 grid points x 2 seeds: 4 members
    assert _trials_at_once(cfg, 4) == 4
    assert _trials_at_once(cfg, 2) is None  # Tune would start the 3rd member only when one had ended
    assert _trials_at_once(load_config(None, [*TINY_MODEL, "tune.scheduler=asha"]), 2) == 2
    with pytest.raises(ConfigError, match=r"^tune.max_epochs: must be set for tune.search bohb with train.max_steps"):
        load_config(None, [*TINY_MODEL, "tune.search=bohb", "train.max_steps=100",
                           "tune.search_space={optim.lr: {loguniform: [0.001, 0.1]}}"])


def test_the_row_a_member_exploits_on_is_on_disk_before_the_exploit_is_saved(tmp_path):
    """An exploit saves Tune's state at once (the member's new generation); Tune hands the result to the recorder
    only after the scheduler returns. A driver killed in between resumed the member as its new generation, and its
    last epoch's row was lost for good (seen in test_beyond_grids' killed PBT study). The scheduler has the
    recorder write the row first."""
    from ray_cifar.results import ResultsLog
    from ray_cifar.tuning import recorder as recorder_module
    from ray_cifar.tuning.recorder import StudyRecorder

    random.seed(0)
    cfg = pbt_config("tune.perturbation_interval=2", "tune.pbt_mutate=[optim.weight_decay]")
    recorder = StudyRecorder(str(tmp_path), lambda config: {}, "val_acc", "max", {"git_sha": "x"}, tensorboard=False)
    scheduler = pbt.create_pbt(cfg, str(tmp_path), record=recorder.record_now)
    scheduler.set_search_properties("val_acc", "max")
    trials = [Trial("__fake", config={"optim.lr": 0.05, "optim.weight_decay": 5e-4, "train.seed": i}, stub=True,
                    trial_id=f"t{i}") for i in range(4)]
    on_disk_at_save = []

    class Saving(FakeController):
        def checkpoint(self, force=False, wait=False):
            super().checkpoint(force, wait)
            on_disk_at_save.append({(r["trial_id"], r["epoch"]) for r in ResultsLog(str(tmp_path)).read()})

    controller = Saving(trials)
    for t in trials:
        t.set_status(Trial.RUNNING)
        scheduler.on_trial_add(controller, t)
    on_disk_at_save.clear()
    writes = []  # trials.json writes (each one an upload too, in a bucket study)
    real_save = recorder._save_trials
    recorder._save_trials = lambda: writes.append(1) or real_save()
    for epoch in (1, 2):
        for t, acc in zip(trials, (0.5, 0.6, 0.7, 0.1)):
            result = {"epoch": epoch, "epochs": 6, "val_acc": acc, "train_loss": 1.0, "training_iteration": epoch}
            scheduler.on_trial_result(controller, t, result)
            recorder.on_trial_result(epoch, trials, t, result)  # Tune's own call, after the scheduler's
            t.run_metadata.last_result = result
    assert len(writes) == 8  # one a result, as without the early write: Tune's call finds row and mark there
    assert all(s[recorder_module.JUDGED] == 2 for s in recorder.trials.values())
    assert controller.paused == ["t3"] and len(on_disk_at_save) == 1
    assert ("t3", 2) in on_disk_at_save[0]
    rows = ResultsLog(str(tmp_path)).read()
    assert sorted((r["trial_id"], r["epoch"]) for r in rows) == [(f"t{i}", e) for i in range(4) for e in (1, 2)]


def test_the_explored_values_follow_train_seed(tmp_path):
    """Two runs of the PBT smoke study explored 0.081 -> 0.114 and 0.081 -> 0.065: Ray's explore draws from
    Python's random, which nothing seeded. The same reports give the same schedule; another train.seed another."""
    def explored(seed: int, folder: str) -> tuple:
        random.seed(1234)  # whatever ran before in the driver
        cfg = pbt_config("tune.perturbation_interval=2", "tune.pbt_mutate=[optim.weight_decay, optim.momentum]",
                         f"train.seed={seed}")
        scheduler, controller, trials = make_population(cfg, tmp_path / folder)
        for epoch in (1, 2):
            for t, acc in zip(trials, (0.5, 0.6, 0.7, 0.1)):
                report(scheduler, controller, t, epoch, acc)
        return trials[3].config["optim.weight_decay"], trials[3].config["optim.momentum"]

    assert explored(0, "a") == explored(0, "b")
    assert len({explored(seed, f"s{seed}") for seed in range(4)}) > 1
