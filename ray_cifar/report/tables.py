"""The report's tables: cells, the trials' summaries, the replicates over seeds (intervals, Welch's test),
published figures matched to trials, a PBT trial's schedule, and the validation split's noise."""

from __future__ import annotations

import html
import math
from typing import Any

import yaml

from ..results import (CONFIDENCE, aggregate_over_seeds, lineage_path, metric_value, summarize_trials,
                       welch_p_value)
from .study import STUDY_COLUMN, Study


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Accuracies and losses print in 4 decimals, as the console's table has them: in significant digits a val_acc of
# 0.32 stood beside 0.2975, and the headline's 0.32 beside the console's 0.3200.
METRIC_COLUMNS = frozenset({"best_metric", "best_val_acc", "val_acc", "train_acc", "test_acc", "val_loss",
                            "train_loss", "test_loss"})


def cell(value: Any, column: str) -> str:
    if column in METRIC_COLUMNS and isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return fmt(value)


def point_label(row: dict[str, Any], keys: list[str]) -> str:
    """'lr=0.1 global_batch_size=128': each searched value under its field name (section kept if needed)."""
    short = {k: k.split(".")[-1] for k in keys}
    names = {k: (k if list(short.values()).count(short[k]) > 1 else short[k]) for k in keys}
    return " ".join(f"{names[k]}={fmt(row.get(k))}" for k in keys) or "(no search)"


def summaries(study: Study) -> list[dict[str, Any]]:
    """Per trial, ranked by the study metric; status and test figures joined from trials.parquet."""
    extra = {t.get("trial_id"): t for t in study.trials}
    out = []
    for s in summarize_trials(study.rows, study.metric, study.mode):
        t = extra.get(s["trial_id"], {})
        joined = ("status", "test_acc", "test_loss", "startup_seconds", "exploits")
        out.append({**s, **{k: t.get(k) for k in joined if k in t}})
    return out


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def html_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r.get(c), c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _mean_std(point: dict[str, Any], scale: float = 1.0) -> str:
    if point["mean"] is None:
        return "-"
    std = f" ± {point['std'] * scale:.2f}" if point["std"] is not None else ""
    return f"{point['mean'] * scale:.2f}{std} (n={point['n']})"


TOP_POINTS = 5  # the points after the best that Welch's test compares with it
SIGNIFICANCE = 0.05  # two-sided p below this: the point differs from the best beyond the seed noise
VERSUS_BEST = "vs best (Welch's t, two-sided)"
NOISE_NOTE = (f"Intervals: Student-t {100 * CONFIDENCE:.0f}% confidence interval of the mean over the point's "
              f"train.seed replicates (mean ± t·s/√n; not clipped to [0, 100]: one beyond says the seeds are too "
              f"few). \"{VERSUS_BEST}\": Welch's unequal-variance t-test of each of the (up to) {TOP_POINTS} points "
              f"after the best against the best; p < {SIGNIFICANCE} says the gap is beyond the "
              f"seed noise, otherwise the two are not told apart (no correction for the several tests). One seed has "
              f"neither (n=1). A point is compared only where all its seeds and all the best's ran the same epochs "
              f"(steps, where train.max_steps sets the length): one that ASHA stopped early (or that diverged) "
              f"differs from the best by its budget as much as by its values, and its mean ± std mixes budgets where "
              f"its own seeds ran different epochs (\"epochs\", or \"steps\", lists them).")


def _interval(point: dict[str, Any], scale: float = 100.0) -> str:
    if point["n"] == 0:
        return "-"
    if point["ci_low"] is None:
        return "n=1: no interval"
    return f"[{point['ci_low'] * scale:.2f}, {point['ci_high'] * scale:.2f}]"


BUDGET = "budget"  # a trial's length in its study's unit (page.build sets it: Study.budget_of); else its epochs
UNITS = {"epochs": "epochs", "steps_run": "steps"}  # Study.budget -> the word the tables and figures use


def length(trial: dict[str, Any]) -> float:
    return (trial[BUDGET] if BUDGET in trial else trial.get("epochs")) or 0


def longest_epochs(trials: list[dict[str, Any]]) -> float:
    """The longest a trial ran (its budget: epochs, or steps). One that ran less (the scheduler stopped it, or it
    diverged) is at its best of a smaller budget: the figures mark it, and their caption says so
    (page.FEWER_EPOCHS_CAPTION)."""
    return max((length(t) for t in trials), default=0)


def ran_fewer(trials: list[dict[str, Any]]) -> list[bool]:
    """Per trial, whether it ran less than the longest (longest_epochs)."""
    longest = longest_epochs(trials)
    return [length(t) < longest for t in trials]


def epochs_text(epochs: list[float]) -> str:
    return ", ".join(str(int(e)) for e in sorted(set(epochs))) or "-"


def _versus_best(point: dict[str, Any], best: dict[str, Any], place: int, epochs: dict[tuple, list[float]],
                 unit: str = "epochs") -> str:
    if place == 0:
        return "best"
    if place > TOP_POINTS:
        return f"(not compared: below the top {TOP_POINTS + 1})"
    if point["n"] == 0:
        return "no score: no epoch of its trials scored (diverged)"
    ours, theirs = epochs.get(point["key"], []), epochs.get(best["key"], [])
    if len(set(ours) | set(theirs)) > 1:  # ASHA stopped some early, or one diverged: budgets differ (NOISE_NOTE)
        return f"not compared: {unit} {epochs_text(ours)} against the best's {epochs_text(theirs)}"
    p = welch_p_value(point["values"], best["values"])
    if p is None:
        return "n=1: no test"
    return f"worse (p={p:.3g})" if p < SIGNIFICANCE else f"within noise (p={p:.2g})"


def replicate_rows(trials: list[dict[str, Any]], keys: list[str], unit: str = "epochs") -> list[dict[str, Any]]:
    """Per searched point, best mean first: the budget its seeds ran (each trial's BUDGET, else its epochs; UNIT
    names it), val_acc at each trial's best epoch over the point's seeds as mean ± std, its t interval, and (top
    points of the best's budget) whether it differs from the best; test_acc beside it where more than one trial
    has one (tune.test all)."""
    def key(p: dict[str, Any]) -> tuple:  # a point's values, exactly (printed, 0.1 and 0.10001 would be one)
        return tuple(repr(p.get(k)) for k in keys)

    points = [{**p, "key": key(p)} for p in aggregate_over_seeds(trials, keys, "val_acc")]
    points.sort(key=lambda p: -(p["mean"] if p["mean"] is not None else -1))
    tested = sum(t.get("test_acc") is not None for t in trials) > 1
    test = {key(p): p for p in aggregate_over_seeds(trials, keys, "test_acc")}
    lengths = [{**t, BUDGET: length(t) or None} for t in trials]
    ran = {key(p): p["values"] for p in aggregate_over_seeds(lengths, keys, BUDGET)}  # each seed's, where known
    rows = []
    for place, p in enumerate(points):
        row = {**{k: p.get(k) for k in keys}, "n": p["n"], unit: epochs_text(ran.get(p["key"], [])),
               "val_acc % (mean ± std)": _mean_std(p, 100.0), f"{100 * CONFIDENCE:.0f}% CI (t)": _interval(p),
               VERSUS_BEST: _versus_best(p, points[0], place, ran, unit)}
        if tested:
            row["test_acc % (mean ± std)"] = _mean_std(test[p["key"]], 100.0)
        rows.append(row)
    return rows


# --- Published figures ---

def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return [float(x) for x in _as_list(a)] == [float(x) for x in _as_list(b)]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _as_list(v: Any) -> list[Any]:
    if isinstance(v, str):
        v = yaml.safe_load(v)  # lists are stored as JSON text in the Parquet columns
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in config.items() if isinstance(section, dict) for k, v in section.items()}


def match_published(study: Study, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each `published:` entry beside the trial it reproduces: all its `where` items equal the trial's values
    (searched columns, else the resolved config), and so do those of its `run` (the study file's model and length,
    validation.pin_published_runs): a --budget-scale or --smoke-test run matches none. A trial matched by several
    entries takes the most specific (most `where` items), all of them when they tie (e.g. a run's val and test
    figures)."""
    base = _flat_config(study.config)
    claimed: dict[Any, tuple[int, list[dict[str, Any]]]] = {}
    for entry in study.config.get("published") or []:
        where = entry.get("where") or {}
        run = {**(entry.get("run") or {}), **where}
        for t in trials:
            values = {k: t[k] if k in t else base.get(k) for k in run}
            try:
                matches = all(_same(values[k], v) for k, v in run.items())
            except (TypeError, ValueError):
                matches = False
            most, entries = claimed.get(t["trial_id"], (-1, []))
            if matches and len(where) >= most:
                claimed[t["trial_id"]] = (len(where), (entries if len(where) == most else []) + [entry])
    out = []
    for t in trials:
        for entry in claimed.get(t["trial_id"], (0, []))[1]:
            metric = entry.get("metric", "test_acc")
            ours = metric_value(t, metric)
            out.append({"trial_id": t["trial_id"], "label": t["label"], "published %": float(entry["value"]),
                        "metric": metric, "ours %": None if ours is None else 100.0 * ours,
                        "source": entry.get("source", "")})
    return out


def schedule_rows(rows, best: dict[str, Any], keys: list[str], metric: str) -> list[dict[str, Any]]:
    """The best trial's best epoch as PBT trained it: per generation on its path (ray_cifar.results.lineage_path),
    its epochs, which member trained them, the values in force, tune.metric at its last epoch, and what it began
    from."""
    if best.get("best_epoch") is None:
        return []
    out = []
    for seg in lineage_path(rows, best["trial_id"], int(best["best_epoch"])):
        if seg.get("missing"):
            began = "unknown: the rows before are not in the results"
        elif seg["parent"] is None:
            began = "scratch (its own initial values)"
        else:
            began = f"trial {seg['parent']}'s state at epoch {seg['parent_epoch']}"
        out.append({"epochs": f"{seg['first_epoch']}-{seg['last_epoch']}",
                    "trained by": f"{seg['trial_id']} (generation {seg['generation']})",
                    **{k: seg["row"].get(k) for k in keys}, f"{metric} at its end": seg["row"].get(metric),
                    "began from": began})
    return out


VAL_Z = 1.96  # the normal quantile of a two-sided 95% interval


def val_noise_note(study: Study, trials: list[dict[str, Any]]) -> str | None:
    """How precisely the validation split measures the best trial's val_acc, and whether its lead over the next is
    larger than that: with a few hundred images two trials apart by a point or two are not told apart by it, and
    one seed a point has no other interval. Binomial, each trial alone (the two share their images, so the gap's own
    noise is smaller: a rough guide); a val_acc ranking of one study (a comparison's validation sizes may differ)."""
    n = (study.config.get("data") or {}).get("val_size")
    scored = [v for t in trials if t.get("best_metric") is not None for v in [metric_value(t, "val_acc")]
              if v is not None]
    if study.metric != "val_acc" or not isinstance(n, int) or n <= 0 or not scored or any(STUDY_COLUMN in t
                                                                                          for t in trials):
        return None
    best = scored[0]
    half = VAL_Z * math.sqrt(best * (1 - best) / n)
    note = (f"Validation noise: {n:,} validation images measure a val_acc near {best:.4f} to about ±{half:.4f} (95%, "
            f"binomial)")
    if len(scored) > 1:
        lead = best - scored[1]
        note += (f"; the best trial's lead over the next, {lead:.4f}, is " +
                 ("within it: this validation split alone does not tell the two apart" if lead < half else
                  "larger than that"))
    return note + "."

