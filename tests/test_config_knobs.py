"""Config knobs that are not one module's: validation split by size or fraction, shuffling, search-space
variants, what --smoke-test does to them, --budget-scale, and `extends`."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from conftest import synthetic_cifar
from ray_cifar.config import ConfigError, DataConfig, field_docs, search_keys
from ray_cifar.validation import load_config, trial_config
from ray_cifar.data.loader import TrainLoader, make_splits


def test_every_new_field_has_a_one_line_doc():
    docs = field_docs()
    for key in ("data.val_fraction", "model.dropout", "model.max_params", "optim.dampening",
                "optim.wd_exclude_norm_bias", "optim.lookahead_k", "optim.lookahead_alpha", "schedule.t_max_epochs",
                "schedule.gamma", "schedule.step_every_iters", "schedule.step_every_epochs",
                "schedule.milestones_epochs", "schedule.onecycle_pct_start", "train.max_steps"):
        assert docs.get(key), key


def test_validation_split_by_size_or_fraction():
    data = synthetic_cifar(500, 10)
    by_size = make_splits(data, load_config(None, ["data.val_size=100"]).data, "cpu")
    assert (len(by_size.train), len(by_size.val)) == (400, 100)  # 40k/10k at CIFAR scale
    cfg = load_config(None, ["data.val_size=null", "data.val_fraction=0.16"])
    by_fraction = make_splits(data, cfg.data, "cpu")
    assert (len(by_fraction.train), len(by_fraction.val)) == (420, 80)  # 84:16
    assert torch.bincount(by_fraction.val.labels).tolist() == [8] * 10  # still class-stratified


def test_exactly_one_of_val_size_and_val_fraction():
    with pytest.raises(ConfigError, match="data.val_fraction: set exactly one"):
        load_config(None, ["data.val_fraction=0.16"])  # val_size still 5000
    with pytest.raises(ConfigError, match="data.val_fraction: set exactly one"):
        load_config(None, ["data.val_size=null"])
    with pytest.raises(ConfigError, match="data.val_fraction"):
        load_config(None, ["data.val_size=null", "data.val_fraction=1.5"])


def test_shuffle_off_keeps_the_order_and_on_reshuffles_each_epoch():
    data = synthetic_cifar(300, 10)
    split = make_splits(data, DataConfig(val_size=0), "cpu").train  # every image in train, in its order
    off = TrainLoader(split, load_config(None, ["data.shuffle=false"]).data, 50, 0, 1, seed=0)
    assert off.epoch_indices(0).tolist() == list(range(300)) == off.epoch_indices(1).tolist()
    on = TrainLoader(split, load_config(None, ["data.shuffle=true"]).data, 50, 0, 1, seed=0)
    assert sorted(on.epoch_indices(0).tolist()) == list(range(300))
    assert on.epoch_indices(0).tolist() != list(range(300))
    assert not torch.equal(on.epoch_indices(0), on.epoch_indices(1))


VARIANTS = ('tune.search_space={variants: {grid: ['
            '{optim.lr: 0.1, train.epochs: 15, schedule.name: constant}, '
            '{optim: {name: adam, lr: 0.001}}, '
            '{train.global_batch_size: 1024, train.epochs: 300}]}}')


def test_variants_set_whole_runs_and_become_columns():
    cfg = load_config(None, [VARIANTS])
    base = cfg.to_dict()
    base["tune"]["search_space"] = {}
    first = trial_config(base, {"variants": cfg.tune.search_space["variants"]["grid"][0]})
    assert (first.optim.lr, first.train.epochs, first.schedule.name) == (0.1, 15, "constant")
    second = trial_config(base, {"variants": cfg.tune.search_space["variants"]["grid"][1]})
    assert (second.optim.name, second.optim.lr, second.train.epochs) == ("adam", 0.001, 30)
    assert search_keys(cfg.tune.search_space) == ["optim.lr", "train.epochs", "schedule.name", "optim.name",
                                                  "train.global_batch_size"]


def test_variants_are_validated_one_by_one_naming_the_key():
    with pytest.raises(ConfigError, match="tune.search_space.variants: value .*optim.lr: must be > 0"):
        load_config(None, ["tune.search_space={variants: {grid: [{optim.lr: 0.1}, {optim.lr: -1}]}}"])
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_config(None, ["tune.search_space={variants: {grid: [{optim.learning_rate: 0.1}]}}"])
    with pytest.raises(ConfigError, match="tune.scheduler: the tune section cannot"):
        load_config(None, ["tune.search_space={variants: {grid: [{tune.scheduler: fifo}]}}"])


def test_smoke_test_shrinks_lengths_and_batches_inside_variants(tmp_path):
    study = tmp_path / "study.yaml"  # --smoke-test shrinks the study file; --set comes after it
    study.write_text(VARIANTS.split("=", 1)[1].join(["tune: {search_space: ", "}"]))
    rows = load_config(str(study), smoke_test=True).tune.search_space["variants"]["grid"]
    assert len(rows) == 2  # the first and the last: a study's opening rows alone missed its point
    assert rows == [{"optim.lr": 0.1, "train.epochs": 6, "schedule.name": "constant"},
                    {"train.global_batch_size": 256, "train.epochs": 6}]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    erasing = load_config(os.path.join(root, "studies", "resnet18_erasing_sweep.yaml"), smoke_test=True)
    assert any("data.erasing_p" in row for row in erasing.tune.search_space["variants"]["grid"])  # ran lr rows only
    study.write_text("train: {max_steps: 32000}\ntune: {search_space: {variants: {grid: ["
                     "{train.global_batch_size: 1024, train.epochs: 300}, "
                     "{model.blocks: [4, 5, 3], model.widths: [64, 128, 256]}]}}}")
    cfg = load_config(str(study), smoke_test=True)
    rows = cfg.tune.search_space["variants"]["grid"]
    assert rows[0] == {"train.global_batch_size": 256, "train.epochs": 6}
    assert rows[1] == {"model.blocks": [1, 1, 1], "model.widths": [16, 32, 64]}
    assert cfg.train.max_steps == 300


def test_smoke_test_keeps_each_schedule_length_its_share_of_the_run(tmp_path):
    """--smoke-test sets the run's length (6 epochs, at most 300 steps) and left the schedule's as written: a decay
    every 20 of adam_batch_lr_grid's 50 epochs never came in a smoke run, nor one every 5,000 of 32,000 steps."""
    from ray_cifar import optim
    from ray_cifar.config.presets import run_length

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "studies", "adam_batch_lr_grid.yaml"), smoke_test=True)
    assert cfg.train.epochs == 6 and cfg.schedule.step_every_epochs == pytest.approx(20 * 6 / 50)
    steps, steps_per_epoch = run_length(cfg)
    decay = optim.lr_multiplier(cfg.schedule, cfg.optim.lr, steps_per_epoch, steps)
    assert decay(steps - 1) == pytest.approx(cfg.schedule.gamma ** 2)  # at 2.4 and 4.8 of its 6 epochs
    study = tmp_path / "steps.yaml"
    study.write_text("schedule: {name: step, step_every_iters: 5000, warmup_epochs: 2}\n"
                     "train: {max_steps: 32000, global_batch_size: 64}\n"
                     "tune: {search_space: {schedule.step_every_iters: {grid: [4000, 8000]}}}\n")
    cfg = load_config(str(study), smoke_test=True)
    assert cfg.train.max_steps == 300
    assert cfg.schedule.step_every_iters == round(5000 * 300 / 32000)
    assert cfg.tune.search_space["schedule.step_every_iters"]["grid"] == [round(4000 * 300 / 32000),
                                                                          round(8000 * 300 / 32000)]
    # An epoch-long length of a step-long run keeps its share too: 2 of the study's 45.5 epochs (703 steps of 64
    # images from 45,000) is 2/45.5 of the smoke run's 4.8 (62 steps of 128 images from 8,000).
    assert cfg.schedule.warmup_epochs == pytest.approx(2 / (32000 / 703) * (300 / 62))


def test_a_length_the_run_ends_before_is_warned_of(tmp_path):
    """A warm-up, a decay period, a first milestone or a PBT interval the run never reaches was taken in silence:
    the study ran its whole budget as another study (--set train.epochs=10 on adam_batch_lr_grid was a constant
    lr). Each is named, with the trials it is in; lengths within the run are not."""
    from ray_cifar.validation import lengths_past_the_run

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    n = 50000  # 45,000 train images after the default 5,000 for validation: 351 steps of 128 an epoch
    past = {
        "schedule.warmup_epochs=5.0: the run's 5 epoch(s) (train.epochs) are all warm-up":
            ["train.epochs=5", "schedule.warmup_epochs=5"],
        "schedule.step_every_epochs=20.0: the run's 10 epoch(s) (train.epochs) end before the first decay":
            ["train.epochs=10", "schedule.name=step", "schedule.step_every_epochs=20"],
        "schedule.milestones_epochs=[30.0]: the run's 30 epoch(s) (train.epochs) end before the first decay":
            ["train.epochs=30", "schedule.name=multistep", "schedule.milestones_epochs=[30]"],
        "schedule.step_every_iters=1000: the run's 1000 steps (train.max_steps) end before the first decay":
            ["train.max_steps=1000", "schedule.name=step", "schedule.step_every_iters=1000"],
        "schedule.warmup_epochs=3.0: the run's 1000 steps (train.max_steps) are all warm-up":  # 2.85 epochs
            ["train.max_steps=1000", "train.global_batch_size=128", "schedule.warmup_epochs=3"],
    }
    for start, sets in past.items():
        lines = lengths_past_the_run(load_config(None, sets), n, searched=False)  # the default study's own
        assert len(lines) == 1 and lines[0].startswith(start), lines
        assert lines[0].endswith("(shorten it too, or shorten the run with --budget-scale X, which scales every "
                                 "length together)")
        sets = sets[:-1] + [sets[-1].replace("=5", "=4.5").replace("=20", "=9.5").replace("=[30]", "=[10, 29]")
                            .replace("=1000", "=999").replace("=3", "=2.8")]
        assert lengths_past_the_run(load_config(None, sets), n, searched=False) == []  # within the run
    more = {  # a later milestone, or a cosine's end, past the run; and how far a warm-up of 5 of 4 epochs climbs
        "schedule.milestones_epochs=[3.0, 25.0]: the run's 4 epoch(s) (train.epochs) end before its last milestone(s); "
        "the lr decays 1 of 2 times": ["schedule.name=multistep", "schedule.milestones_epochs=[3, 25]"],
        "schedule.t_max_epochs=50.0: the run's 4 epoch(s) (train.epochs) end before the cosine does; the lr ends at "
        "98% of optim.lr, not at eta_min": ["schedule.name=cosine", "schedule.t_max_epochs=50"],
        "schedule.warmup_epochs=5.0: the run's 4 epoch(s) (train.epochs) are all warm-up; the lr climbs to 80% of "
        "optim.lr, at the last step": ["schedule.warmup_epochs=5"],
    }
    for start, sets in more.items():
        [line] = lengths_past_the_run(load_config(None, ["train.epochs=4", *sets]), n, searched=False)
        assert line.startswith(start), line
    assert lengths_past_the_run(load_config(None, ["train.epochs=4", "schedule.t_max_epochs=4"]), n, False) == []
    pbt = os.path.join(root, "studies", "resnet18_pbt.yaml")
    assert lengths_past_the_run(load_config(pbt), n) == []
    [line] = lengths_past_the_run(load_config(pbt, ["train.epochs=2"]), n)
    assert line.startswith("tune.perturbation_interval=2: the run's 2 epoch(s) (train.epochs) end before the first "
                           "perturbation") and "pbt never exploits nor explores" in line
    adam = os.path.join(root, "studies", "adam_batch_lr_grid.yaml")
    cfg = load_config(adam, ["tune.search_space={train.epochs: {grid: [10, 50]}, optim.lr: {grid: [0.1, 0.01]}}"])
    [line] = lengths_past_the_run(cfg, n)
    assert line.startswith("2 of the 4 trials: schedule.step_every_epochs=20.0: the run's 10 epoch(s)")
    # One line a field and run length, with each of its values there: optimizer_batch_decay's 12 trials decay every
    # 4,000 to 10,000 steps (a grid of rows), none within 4,000 steps.
    study = os.path.join(root, "studies", "optimizer_batch_decay.yaml")
    assert lengths_past_the_run(load_config(study, ["train.max_steps=4000"]), n) == [
        "schedule.step_every_iters=5000 / 4000 / 8000 / 10000: the run's 4000 steps (train.max_steps) end before the "
        "first decay; the lr never decays (a constant lr) (shorten it too, or shorten the run with --budget-scale X, "
        "which scales every length together)"]
    [line] = lengths_past_the_run(load_config(study, ["train.max_steps=4500"]), n)
    assert line.startswith("11 of the 12 trials: schedule.step_every_iters=5000 / 8000 / 10000: ")
    assert lengths_past_the_run(cfg, n, searched=False) == []  # the fixed config's 50 epochs
    study = tmp_path / "pbt.yaml"  # --smoke-test's 6 epochs keep a PBT study's interval where it fits, else scale it
    study.write_text(open(pbt).read().replace("perturbation_interval: 2", "perturbation_interval: 10"))
    assert load_config(str(study), smoke_test=True).tune.perturbation_interval == 2  # 10 of 30 epochs: 2 of 6
    assert load_config(pbt, smoke_test=True).tune.perturbation_interval == 2
    # A smoke run of each shipped study has nothing to warn of on CIFAR-10's 50,000 images.
    for path in glob.glob(os.path.join(root, "studies", "*.yaml")):
        assert lengths_past_the_run(load_config(path, smoke_test=True), n) == [], path


def test_smoke_test_keeps_a_validation_fraction():
    cfg = load_config(None, ["data.val_size=null", "data.val_fraction=0.16"], smoke_test=True)
    assert cfg.data.val_size is None and cfg.data.val_fraction == 0.16


def test_budget_scale_scales_every_length_fixed_and_searched():
    cfg = load_config(None, [VARIANTS, "schedule.name=multistep", "schedule.milestones_epochs=[10, 20]",
                             "schedule.warmup_epochs=2", "tune.scheduler=fifo"], budget_scale=0.1)
    assert cfg.train.epochs == 3 and cfg.schedule.milestones_epochs == pytest.approx([1, 2])
    assert cfg.schedule.warmup_epochs == pytest.approx(0.2)
    rows = cfg.tune.search_space["variants"]["grid"]
    assert rows[0]["train.epochs"] == 2 and rows[2]["train.epochs"] == 30  # 15 -> 1.5 rounds to 2
    cfg = load_config(None, ["train.max_steps=32000", "schedule.name=step", "schedule.step_every_iters=5000",
                             "tune.search_space={schedule.step_every_iters: {grid: [4000, 8000]}}"], budget_scale=0.25)
    assert (cfg.train.max_steps, cfg.schedule.step_every_iters) == (8000, 1250)
    assert cfg.tune.search_space["schedule.step_every_iters"]["grid"] == [1000, 2000]
    with pytest.raises(ConfigError, match="--budget-scale"):
        load_config(None, [], budget_scale=0)


def test_budget_scale_and_smoke_test_reach_searched_ranges_too(tmp_path):
    """Both mapped grid and choice values only: train.epochs {randint: [10, 20]} at --budget-scale 0.1 ran 10-20
    epochs, and {randint: [50, 100]} in a smoke test 50-100 (the README promises every length in the space)."""
    space = ("{train.epochs: {randint: [10, 20]}, schedule.warmup_epochs: {uniform: [1, 5]}, "
             "optim.lr: {loguniform: [0.001, 0.1]}}")
    cfg = load_config(None, [f"tune.search_space={space}"], budget_scale=0.1)
    assert cfg.tune.search_space == {"train.epochs": {"randint": [1, 2]},
                                     "schedule.warmup_epochs": {"uniform": [pytest.approx(0.1), pytest.approx(0.5)]},
                                     "optim.lr": {"loguniform": [0.001, 0.1]}}  # not a length: as it was
    cfg = load_config(None, ["tune.search_space={train.epochs: {randint: [10, 12]}}"], budget_scale=0.1)
    assert cfg.tune.search_space == {"train.epochs": {"choice": [1]}}  # both ends one value: that value
    study = tmp_path / "ranges.yaml"  # --smoke-test shrinks the study file; --set comes after it
    study.write_text("tune: {search_space: {train.epochs: {randint: [50, 100]}, "
                     "train.global_batch_size: {randint: [128, 4096]}}}\n")
    cfg = load_config(str(study), smoke_test=True)
    assert cfg.tune.search_space == {"train.epochs": {"choice": [6]}, "train.global_batch_size": {"randint": [128, 256]}}


def test_extends_applies_the_parent_first(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 50, global_batch_size: 100}\noptim: {lr: 0.01}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain: {epochs: 5}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.train.epochs, cfg.train.global_batch_size, cfg.optim.lr) == (5, 100, 0.01)
    (tmp_path / "orphan.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=rf"gone.yaml \(named by extends: in {tmp_path / 'orphan.yaml'}\): No such"):
        load_config(str(tmp_path / "orphan.yaml"))
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends"):
        load_config(str(tmp_path / "loop.yaml"))


def test_max_steps_relaxes_the_asha_epoch_checks():
    load_config(None, ["train.max_steps=32000", "train.epochs=1", "tune.grace_period=5"])
    with pytest.raises(ConfigError, match="tune.grace_period"):
        load_config(None, ["train.epochs=1", "tune.grace_period=5"])


def test_asha_knobs_and_tune_test_are_checked():
    cfg = load_config(None, ["tune.brackets=3", "tune.test=all", "tune.time_attr=steps", "train.max_steps=500",
                             "tune.grace_period=50"])
    assert (cfg.tune.brackets, cfg.tune.test, cfg.tune.time_attr) == (3, "all", "steps")
    for sets, key in ((["tune.test=some"], "tune.test"), (["tune.brackets=0"], "tune.brackets"),
                      (["tune.time_attr=seconds"], "tune.time_attr"),
                      (["tune.time_attr=steps", "tune.max_epochs=3"], "tune.max_epochs"),
                      (["tune.time_attr=steps", "train.max_steps=40", "tune.grace_period=50"], "tune.grace_period")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, sets)
