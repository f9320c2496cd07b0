"""Optimizers: each builds and steps; SGD dampening, Lookahead and weight-decay groups against hand computations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ray_cifar.config import ConfigError, OptimConfig, ScheduleConfig
from ray_cifar.validation import load_config
from ray_cifar.optim import Lookahead, create_optimizer, create_scheduler, list_optimizers, param_groups


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))


def _loss(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    return nn.functional.cross_entropy(model(x), y)


def test_registry_lists_every_optimizer_of_the_studies():
    assert {"sgd", "adam", "adamw", "adagrad", "asgd"} <= set(list_optimizers())


@pytest.mark.parametrize("name", list_optimizers())
@pytest.mark.parametrize("lookahead_k", [None, 2])
def test_each_optimizer_builds_steps_and_lowers_the_loss(name, lookahead_k):
    model = _tiny_model()
    lr = {"sgd": 0.05, "asgd": 0.05, "adagrad": 0.05}.get(name, 1e-3)
    opt = create_optimizer(model, OptimConfig(name=name, lr=lr, weight_decay=1e-4, lookahead_k=lookahead_k))
    before = copy.deepcopy(model.state_dict())
    first = _loss(model).item()
    for _ in range(6):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _loss(model).item() < first


def test_sgd_dampening_scales_new_gradients_in_the_momentum_buffer():
    # torch: buf_1 = g_1 (first step is undampened); buf_t = m * buf_{t-1} + (1 - d) * g_t.
    w = nn.Parameter(torch.tensor([1.0]))
    opt = create_optimizer(nn.ParameterList([w]), OptimConfig(name="sgd", lr=0.1, momentum=0.9, dampening=0.5,
                                                             nesterov=False, weight_decay=0.0))
    grads = [2.0, 4.0]
    buf, expected = 0.0, 1.0
    for t, g in enumerate(grads):
        w.grad = torch.tensor([g])
        opt.step()
        buf = g if t == 0 else 0.9 * buf + 0.5 * g
        expected -= 0.1 * buf
    assert w.item() == pytest.approx(expected)  # 1 - 0.1*2 - 0.1*(1.8 + 2.0) = 0.42
    assert expected == pytest.approx(0.42)


def test_nesterov_with_dampening_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.dampening"):
        load_config(None, ["optim.dampening=0.5"])  # nesterov is on by default
    load_config(None, ["optim.dampening=0.5", "optim.nesterov=false"])


def test_lookahead_slow_fast_update_matches_hand_computation():
    # Plain SGD (lr 0.1) on f(w) = w^2 / 2, so each fast step is w <- w - 0.1 * w = 0.9 w.
    w = nn.Parameter(torch.tensor([1.0]))
    opt = create_optimizer(nn.ParameterList([w]), OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
                                                             lookahead_k=3, lookahead_alpha=0.5))
    assert isinstance(opt, Lookahead)
    slow, fast, seen = 1.0, 1.0, []
    for t in range(1, 7):
        opt.zero_grad()
        (w ** 2 / 2).sum().backward()
        opt.step()
        fast *= 0.9
        if t % 3 == 0:
            slow = slow + 0.5 * (fast - slow)
            fast = slow
        seen.append(w.item())
        assert w.item() == pytest.approx(fast, rel=1e-6), f"step {t}"
    # After step 3: fast 0.729, slow 1 + 0.5 * (0.729 - 1) = 0.8645, and the weights jump back to it.
    assert seen[2] == pytest.approx(0.8645)
    assert opt.state[w]["slow"].item() == pytest.approx(slow)


def test_lookahead_shares_param_groups_with_lambdalr_and_round_trips_state_dict():
    model = _tiny_model()
    cfg = OptimConfig(name="sgd", lr=0.1, lookahead_k=2)
    opt = create_optimizer(model, cfg)
    sched = create_scheduler(opt, ScheduleConfig(name="step", step_every_iters=1, gamma=0.5), cfg.lr, 10, 10)
    for _ in range(3):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
        sched.step()
    # The scheduler's lr reached the base optimizer, which is what actually steps.
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    state = copy.deepcopy(opt.state_dict())

    other = _tiny_model()
    other.load_state_dict(model.state_dict())
    opt2 = create_optimizer(other, cfg)
    opt2.load_state_dict(state)
    assert opt2.fast_steps == 3 and opt2.param_groups is opt2.base.param_groups
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(opt.state[p]["slow"], opt2.state[q]["slow"])
    # Both continue identically (momentum buffers and slow weights restored).
    for m, o in ((model, opt), (other, opt2)):
        o.zero_grad()
        _loss(m).backward()
        o.step()
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.allclose(p, q)


def test_wd_exclusion_puts_norm_and_bias_params_in_a_zero_decay_group():
    model = _tiny_model()
    conv, bn, _, fc = model
    groups = param_groups(model, OptimConfig(wd_exclude_norm_bias=True))
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert decay == {id(conv.weight), id(fc.weight)}
    assert no_decay == {id(conv.bias), id(bn.weight), id(bn.bias), id(fc.bias)}
    assert groups[1]["weight_decay"] == 0.0
    assert len(param_groups(model, OptimConfig())) == 1


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adagrad", "asgd"])
def test_excluded_params_with_zero_grad_are_not_decayed(name):
    model = _tiny_model()
    conv, bn, _, fc = model
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(1.0)
        fc.bias.fill_(1.0)
    opt = create_optimizer(model, OptimConfig(name=name, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.5,
                                              wd_exclude_norm_bias=True))
    excluded = {"bn.weight": bn.weight, "bn.bias": bn.bias, "fc.bias": fc.bias, "conv.bias": conv.bias}
    before = {k: p.detach().clone() for k, p in excluded.items()}
    decayed_before = fc.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for k, p in excluded.items():
        assert torch.equal(p, before[k]), f"{name}: {k} changed with zero grad: it was decayed"
    # Control: the decayed weight does move with a zero gradient (the test could fail).
    assert not torch.equal(fc.weight, decayed_before)
