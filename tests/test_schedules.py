"""Schedules: the lr at chosen iterations against each schedule's formula; train.max_steps ends the run exactly."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_MODEL, synthetic_cifar
from ray_cifar.config import ConfigError, ScheduleConfig
from ray_cifar.validation import load_config
from ray_cifar.optim import create_scheduler, list_schedules, lr_multiplier

LR = 0.1
SPE = 10  # steps per epoch


def _lrs(cfg: ScheduleConfig, total_steps: int, lr: float = LR) -> list[float]:
    """The lr of every iteration as a real LambdaLR on a real optimizer delivers it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = create_scheduler(opt, cfg, lr, SPE, total_steps)
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_registry_has_every_schedule_of_the_studies():
    assert {"constant", "cosine", "step", "multistep", "onecycle"} <= set(list_schedules())


def test_constant():
    assert _lrs(ScheduleConfig(name="constant"), 25) == [LR] * 25


def test_cosine_over_the_whole_run_with_eta_min():
    total, eta_min = 100, 0.001
    lrs = _lrs(ScheduleConfig(name="cosine", eta_min=eta_min), total)
    for t in (0, 25, 50, 99):
        assert lrs[t] == pytest.approx(eta_min + (LR - eta_min) * 0.5 * (1 + math.cos(math.pi * t / total)))
    assert lrs[50] == pytest.approx((LR + eta_min) / 2)


def test_cosine_t_max_epochs_then_stays_at_eta_min():
    lrs = _lrs(ScheduleConfig(name="cosine", t_max_epochs=4, eta_min=0.01), 80)  # T_max = 40 iterations
    assert lrs[20] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert lrs[40] == pytest.approx(0.01) and lrs[79] == pytest.approx(0.01)


def test_step_every_iterations():
    lrs = _lrs(ScheduleConfig(name="step", step_every_iters=7, gamma=0.2), 30)
    for t in (0, 6, 7, 13, 14, 29):
        assert lrs[t] == pytest.approx(LR * 0.2 ** (t // 7)), t


def test_step_every_epochs():
    lrs = _lrs(ScheduleConfig(name="step", step_every_epochs=2, gamma=1 / 3), 50)
    assert lrs[19] == pytest.approx(LR)
    assert lrs[20] == pytest.approx(LR / 3)  # epoch 2 starts at iteration 20
    assert lrs[40] == pytest.approx(LR / 9)


def test_step_needs_exactly_one_period():
    with pytest.raises(ConfigError, match="schedule.step_every_iters"):
        load_config(None, ["schedule.name=step"])
    with pytest.raises(ConfigError, match="schedule.step_every_iters"):
        load_config(None, ["schedule.name=step", "schedule.step_every_iters=5", "schedule.step_every_epochs=1"])


def test_multistep():
    lrs = _lrs(ScheduleConfig(name="multistep", milestones_epochs=[1.5, 3], gamma=0.1), 40)
    assert lrs[14] == pytest.approx(LR)
    assert lrs[15] == pytest.approx(LR * 0.1)
    assert lrs[29] == pytest.approx(LR * 0.1)
    assert lrs[30] == pytest.approx(LR * 0.01)


def test_multistep_milestones_are_validated():
    with pytest.raises(ConfigError, match="schedule.milestones_epochs"):
        load_config(None, ["schedule.name=multistep"])
    with pytest.raises(ConfigError, match="schedule.milestones_epochs"):
        load_config(None, ["schedule.name=multistep", "schedule.milestones_epochs=[30, 10]"])


def test_onecycle_matches_torch_onecycle_lr():
    total = 60
    cfg = ScheduleConfig(name="onecycle", onecycle_pct_start=0.25, onecycle_div_factor=10,
                         onecycle_final_div_factor=100)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=total, pct_start=0.25, div_factor=10,
                                              final_div_factor=100, anneal_strategy="cos", cycle_momentum=False)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    ours = _lrs(cfg, total)
    assert ours == pytest.approx(expected, rel=1e-9)
    # And the formula's landmarks: start lr/div, the peak at iteration pct*total - 1, end start/final_div.
    assert ours[0] == pytest.approx(LR / 10)
    assert max(ours) == pytest.approx(LR) and ours.index(max(ours)) == 14
    assert ours[-1] == pytest.approx(LR / 10 / 100)


@pytest.mark.parametrize("name", list_schedules())
def test_linear_warmup_before_every_schedule(name):
    extra = {"step": {"step_every_iters": 1000}, "multistep": {"milestones_epochs": [100]}}.get(name, {})
    cfg = ScheduleConfig(name=name, warmup_epochs=0.5, **extra)  # 5 warm-up iterations
    lrs = _lrs(cfg, 40)
    for t in range(5):
        assert lrs[t] == pytest.approx(LR * (t + 1) / 5), t
    after = lr_multiplier(ScheduleConfig(name=name, warmup_epochs=0.5, **extra), LR, SPE, 40)
    assert lrs[5] == pytest.approx(LR * after(5))
    if name in ("constant", "cosine", "step", "multistep"):
        assert lrs[5] == pytest.approx(LR)  # these start the schedule from its peak after warm-up


def test_cosine_after_warmup_spans_the_rest_of_the_run():
    lrs = _lrs(ScheduleConfig(name="cosine", warmup_epochs=1), 50)  # 10 warm-up, 40 cosine
    assert lrs[10] == pytest.approx(LR)
    assert lrs[30] == pytest.approx(LR * 0.5)


def _run(sets):
    from ray_cifar.data.loader import make_splits
    from ray_cifar.loop import run_training
    from ray_cifar.data.pipelines import train_loader_for

    cfg = load_config(None, TINY_MODEL + ["train.amp=fp32", "train.global_batch_size=50", "data.val_size=50",
                                          "train.torch_threads=1", "optim.lr=0.1"] + sets)
    splits = make_splits(synthetic_cifar(200, 20), cfg.data, "cpu")  # 150 train images: 3 steps per epoch
    epochs = []
    run_training(cfg, train_loader_for(cfg, splits.train, torch.device("cpu")), splits.val, torch.device("cpu"), on_epoch=lambda m, model: epochs.append(m), log=None)
    return epochs


def test_max_steps_stops_after_exactly_that_many_steps_and_the_schedule_spans_them():
    epochs = _run(["train.max_steps=7", "train.epochs=100", "schedule.name=step", "schedule.step_every_iters=3",
                   "schedule.gamma=0.5"])
    assert [m["epoch"] for m in epochs] == [1, 2, 3]  # ceil(7 / 3)
    assert [m["steps"] for m in epochs] == [3, 6, 7]
    assert [m["train_images"] for m in epochs] == [150, 150, 50]  # the last epoch cut short to one step
    assert [m["lr"] for m in epochs] == pytest.approx([0.1, 0.05, 0.025])  # lr of each epoch's first step
    assert all(m["epochs"] == 3 for m in epochs)


def test_without_max_steps_epochs_decide():
    epochs = _run(["train.epochs=2", "schedule.name=cosine"])
    assert [m["steps"] for m in epochs] == [3, 6]
    # Cosine over 6 steps: the second epoch starts at step 3, the half-way point.
    assert epochs[1]["lr"] == pytest.approx(0.05)
