"""What stopped trials early, as the study's scheduler decides it: ASHA's rungs and BOHB's HyperBand brackets in
epochs, and in words."""

from __future__ import annotations

from typing import Any

from ..milestones import hyperband_brackets
from .study import ONE_RUN
from .tables import fmt


def asha_rungs(tune: dict[str, Any], max_t: float) -> list[float]:
    """Where ASHA decides, in epochs: grace_period * reduction_factor^k, below max_t; BOHB's HyperBand: its first
    bracket's milestones before max_t (empty for other schedulers, and for rungs in optimizer steps, tune.time_attr
    steps, which this epoch axis cannot show)."""
    if tune.get("search") == "bohb":
        brackets = hyperband_brackets(max_t, tune.get("reduction_factor") or 3)
        return [float(m) for m in brackets[0][1] if m < max_t] if brackets else []
    if tune.get("scheduler", "asha") != "asha" or tune.get("time_attr", "epoch") != "epoch":
        return []
    grace, factor = float(tune.get("grace_period") or 1), float(tune.get("reduction_factor") or 4)
    rungs, rung = [], grace
    while rung < max_t and factor > 1:
        rungs.append(rung)
        rung *= factor
    return rungs


def scheduler_text(tune: dict[str, Any], max_t: float) -> str:
    """What stopped trials early, in words. BOHB brings its own HyperBand (tune.scheduler stays fifo there): it was
    drawn as "fifo: no rungs", its stopped trials unexplained."""
    scheduler = tune.get("scheduler", "?")
    if scheduler == ONE_RUN:
        return "one run of python -m ray_cifar.train: no scheduler, every epoch it planned was trained"
    if tune.get("search") == "bohb":
        brackets = hyperband_brackets(max_t, tune.get("reduction_factor") or 3)
        each = "; ".join(f"{places} places, judged at epoch{'s' * (len(ms) > 2)} {', '.join(map(str, ms[:-1]))}, "
                         f"the last at {ms[-1]}" if len(ms) > 1 else f"{places} places, run to {ms[-1]}"
                         for places, ms in brackets)
        factor = fmt(tune.get("reduction_factor") or 3)
        return (f"BOHB's HyperBand, reduction {factor}, max {max_t:g}: brackets filled in turn, the best 1/{factor} "
                f"going on at each milestone ({each}; drawn: the first's)")
    if scheduler in ("pbt", "pb2"):
        return f"{scheduler}: no trial stops early; the weak copy the strong (the population figure below)"
    if scheduler != "asha":
        return f"{scheduler}: no rungs"
    if tune.get("time_attr", "epoch") != "epoch":
        detail = (f"rungs every x{fmt(tune.get('reduction_factor'))} from {fmt(tune.get('grace_period'))} optimizer "
                  f"steps")
    else:
        rungs = asha_rungs(tune, max_t)
        detail = (f"grace {fmt(tune.get('grace_period'))}, reduction {fmt(tune.get('reduction_factor'))}, "
                  f"rungs at {', '.join(f'{r:g}' for r in rungs)}, max {max_t:g}")
    if (tune.get("brackets") or 1) > 1:
        detail += f"; {tune['brackets']} brackets (drawn: the first's)"
    return f"asha: {detail}"


def stops_text(tune: dict[str, Any], max_t: float) -> str:
    """scheduler_text; for a comparison of studies whose schedulers differ (study.combine), each study's."""
    if tune.get("scheduler") == "mixed":
        own = tune["max_t_by_study"]
        return "; ".join(f"{name}: {scheduler_text(t, own[name])}" for name, t in tune["per_study"].items())
    return scheduler_text(tune, max_t)
