"""Where BOHB's HyperBand judges trials, in whole epochs: the rule the Ray layer's scheduler runs
(tuning.scheduler.BOHBHyperBand) and the report draws (report.schedulers), written once. No Ray."""

from __future__ import annotations

import math


def first_milestone(max_t: float, reduction_factor: float, s: int) -> int:
    """The first milestone of bracket s: ceil(max_t / reduction_factor^s). Ray's rounds down, and then no bracket
    reaches max_t (tuning.scheduler.BOHBHyperBand says why that matters)."""
    return max(1, math.ceil(max_t / reduction_factor ** s - 1e-9))


def hyperband_brackets(max_t: float, reduction_factor: float) -> list[tuple[int, list[int]]]:
    """The brackets in the order the scheduler fills them (a bracket takes trials until full, then the next): (its
    places, its milestones in epochs, the last max_t). The places and the bracket count follow Ray's HyperBand
    (its _get_n0 and _s_max_1; a test compares the two for several lengths)."""
    eta = float(reduction_factor)
    if max_t < 1 or eta <= 1:
        return []
    s_max_1 = int(round(math.log(max_t) / math.log(eta))) + 1
    brackets = []
    for s in range(s_max_1 - 1, -1, -1):
        milestone = first_milestone(max_t, eta, s)
        milestones = [milestone]
        for _ in range(s):
            milestone = int(min(milestone * eta, max_t))
            milestones.append(milestone)
        brackets.append((int(math.ceil(s_max_1 / (s + 1) * eta ** s)), milestones))
    return brackets
