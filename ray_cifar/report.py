"""A study's report: figures and tables made only from OUTPUT/config.yaml and its Parquet files.

    python -m ray_cifar.report out/smoke                  # out/smoke/report.html, report.md, figures/*.png
    python -m ray_cifar.report out/sgd out/adam           # one comparison: out/sgd/compare-report.html
    python -m ray_cifar.report out/sgd out/adam --out cmp # ... or cmp/compare-report.html
    python -m ray_cifar.report s3://B/studies/asha-1      # a study in a bucket: ./asha-1-report/report.html

Tables: the trials; per searched point, val_acc over its train.seed replicates with a Student-t 95%
interval and, for the top points, Welch's t-test against the best ("within noise" or "worse"); each run
beside its published figure (the `published:` entries of config.yaml; with tune.test all every
finished trial has a test figure). A PBT or PB2 study has no points (its members' values change, their
weights come from donors): the best trial's schedule, followed back through its donors, stands in place
of the replicates, and the per-field figures and heatmaps are left out. Figures: the trial ranking (by
tune.metric and tune.mode; the test-evaluated trials marked), learning curves, where ASHA stopped each trial
against its rungs, accuracy against each searched field (mean and std over seeds), a heatmap of mean accuracy for each
pair of searched fields, images/s per trial, and the published figures. The HTML references the
PNGs by relative path, so the folder can be moved or copied whole. Runs on a finished output, or on one a killed study left behind.
A comparison ranks every trial by the first output's tune.metric and tune.mode, and adds a
"study" column (each output's folder name) to the searched fields.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import storage
from .config import cut_short, flatten, load_yaml, yaml_problem
from .results import (CONFIDENCE, FINISHED, SEED_KEY, DamagedFile, aggregate_over_seeds, is_train_output, lineage_path,
                      metric_value, read_results, read_rows, read_trials_state, searched_columns, summarize_trials,
                      welch_p_value)

FIGURES = ("ranking", "curves", "asha", "params", "heatmap", "throughput", "published")
MAX_HEATMAPS = 3  # pairs of searched fields drawn as heatmaps (those with the most cells)
STUDY_COLUMN = "study"  # the extra searched column of a comparison: which output a trial came from


class NotAStudyOutput(Exception):
    pass


@dataclass
class Study:
    """What the report reads from one output folder."""

    name: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]  # one per trial per epoch
    trials: list[dict[str, Any]] = field(default_factory=list)  # trials.parquet, if the study got that far
    unfinished: bool = False  # no trials.parquet yet: the trials (and their statuses) so far, from trials.json
    one_run: bool = False  # a `python -m ray_cifar.train` run's output: no scheduler, whatever its tune section says
    last_phase_cut: bool = False  # trials.parquet, but no FINISHED: stopped in its test evaluation
    location: str = "OUTPUT"  # the folder or URI as its user names it (what --resume takes); a comparison: OUTPUT

    @property
    def tune(self) -> dict[str, Any]:
        tune = self.config.get("tune") or {}
        return {**tune, "scheduler": ONE_RUN, "search": None} if self.one_run else tune

    @property
    def metric(self) -> str:
        return self.tune.get("metric", "val_acc")

    @property
    def mode(self) -> str:
        return self.tune.get("mode", "max")


def load_study(output: str) -> Study:
    config_path = os.path.join(output, "config.yaml")
    trials_path = os.path.join(output, "trials.parquet")
    finished = os.path.exists(os.path.join(output, FINISHED))
    has_results = os.path.exists(os.path.join(output, "results.parquet")) or os.path.isdir(
        os.path.join(output, "results.parts"))
    if not os.path.isfile(config_path) or not (has_results or finished):
        raise NotAStudyOutput(f"{output} is not a study output (needs config.yaml and results.parquet)")
    try:
        with open(config_path, "rb") as f:
            text = f.read().decode("utf-8")
        config = load_yaml(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: not UTF-8
        raise NotAStudyOutput(f"{config_path} is damaged ({yaml_problem(e)})") from None
    if not isinstance(config, dict) or not config:
        # Empty too: every section at its default ranked a val_loss study by val_acc, without a word.
        raise NotAStudyOutput(f"{config_path} is damaged ({'empty' if not config else 'not a mapping of sections'})")
    why = cut_short(config, text)
    if why:  # truncated: as empty, only partly
        raise NotAStudyOutput(f"{config_path} is damaged ({why})")
    if finished and not os.path.exists(trials_path):  # not a study still running: one whose table is gone
        raise DamagedFile(f"{trials_path} is missing (the study finished)")
    trials = read_rows(trials_path) if os.path.exists(trials_path) else []
    name = os.path.basename(os.path.normpath(os.path.abspath(output)))
    rows = read_results(output)
    if not rows and trials:  # a finished study's results gone (moved, deleted): an empty report is no report
        raise DamagedFile(f"{os.path.join(output, 'results.parquet')} is missing (trials.parquet lists "
                          f"{len(trials)} trial(s))")
    so_far = [] if trials else running_study_trials(output)
    trials = trials or so_far or train_run_trials(output, rows)
    one_run = is_train_output(output)
    return Study(name=name, config=config, rows=rows, trials=trials, unfinished=bool(so_far), one_run=one_run,
                 last_phase_cut=bool(trials) and not so_far and not finished and not one_run)


def running_study_trials(output: str) -> list[dict[str, Any]]:
    """A study that has not finished (running, stopped or killed) has no trials.parquet yet: its trials.json holds
    each trial's status so far (its report had no status column, and said nothing of trials not finished)."""
    trials = read_trials_state(output) or {}  # none, or damaged: the rows are still reported
    return [{"trial_id": tid, **t} for tid, t in trials.items()]


def train_run_trials(output: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A `python -m ray_cifar.train` run's one trial: it keeps its test figures in test.json, not trials.parquet
    (its report showed test_acc "-" beside a test.json that had it)."""
    path = os.path.join(output, "test.json")
    run_ids = {r.get("trial_id") for r in rows}
    if len(run_ids) != 1 or not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            test = json.load(f)
    except (OSError, ValueError):
        return []  # a damaged test.json: the rows are still reported
    # test.json is written at the run's end: it ran every epoch, or stopped at one that diverged.
    status = "diverged" if any(r.get("diverged") for r in rows) else "completed"
    return [{"trial_id": run_ids.pop(), "status": status, "test_acc": test.get("test_acc"),
             "test_loss": test.get("test_loss")}]


# --- Tables ---

def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Accuracies and losses print in 4 decimals, as the console's table has them: in significant digits a val_acc of
# 0.32 stood beside 0.2975, and the headline's 0.32 beside the console's 0.3200.
METRIC_COLUMNS = frozenset({"best_metric", "best_val_acc", "val_acc", "train_acc", "test_acc", "val_loss",
                            "train_loss", "test_loss"})


def _cell(value: Any, column: str) -> str:
    if column in METRIC_COLUMNS and isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return _fmt(value)


def point_label(row: dict[str, Any], keys: list[str]) -> str:
    """'lr=0.1 global_batch_size=128': each searched value under its field name (section kept if needed)."""
    short = {k: k.split(".")[-1] for k in keys}
    names = {k: (k if list(short.values()).count(short[k]) > 1 else short[k]) for k in keys}
    return " ".join(f"{names[k]}={_fmt(row.get(k))}" for k in keys) or "(no search)"


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
    lines += ["| " + " | ".join(_cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def html_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c), c))}</td>" for c in columns) + "</tr>"
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
              f"neither (n=1). A point is compared only where all its seeds and all the best's ran the same epochs: "
              f"one that ASHA stopped early (or that diverged) differs from the best by its budget as much as by its "
              f"values, and its mean ± std mixes budgets where its own seeds ran different epochs (\"epochs\" "
              f"lists them).")
TEST_ALL_NOTE = ("test_acc: every finished trial was evaluated once on the test split, at its best validation epoch "
                 "(tune.test all), after the study; no test figure chose any trial, epoch or point.")


def _interval(point: dict[str, Any], scale: float = 100.0) -> str:
    if point["n"] == 0:
        return "-"
    if point["ci_low"] is None:
        return "n=1: no interval"
    return f"[{point['ci_low'] * scale:.2f}, {point['ci_high'] * scale:.2f}]"


def _epochs_text(epochs: list[float]) -> str:
    return ", ".join(str(int(e)) for e in sorted(set(epochs))) or "-"


def _versus_best(point: dict[str, Any], best: dict[str, Any], place: int, epochs: dict[tuple, list[float]]) -> str:
    if place == 0:
        return "best"
    if place > TOP_POINTS:
        return f"(not compared: below the top {TOP_POINTS + 1})"
    if point["n"] == 0:
        return "no score: no epoch of its trials scored (diverged)"
    ours, theirs = epochs.get(point["key"], []), epochs.get(best["key"], [])
    if len(set(ours) | set(theirs)) > 1:  # ASHA stopped some early, or one diverged: budgets differ (NOISE_NOTE)
        return f"not compared: epochs {_epochs_text(ours)} against the best's {_epochs_text(theirs)}"
    p = welch_p_value(point["values"], best["values"])
    if p is None:
        return "n=1: no test"
    return f"worse (p={p:.3g})" if p < SIGNIFICANCE else f"within noise (p={p:.2g})"


def replicate_rows(trials: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Per searched point, best mean first: the epochs its seeds ran, val_acc at each trial's best epoch over
    the point's seeds as mean ± std, its t interval, and (top points of the best's epochs) whether it differs
    from the best; test_acc beside it where more than one trial has one (tune.test all)."""
    def key(p: dict[str, Any]) -> tuple:  # a point's values, exactly (printed, 0.1 and 0.10001 would be one)
        return tuple(repr(p.get(k)) for k in keys)

    points = [{**p, "key": key(p)} for p in aggregate_over_seeds(trials, keys, "val_acc")]
    points.sort(key=lambda p: -(p["mean"] if p["mean"] is not None else -1))
    tested = sum(t.get("test_acc") is not None for t in trials) > 1
    test = {key(p): p for p in aggregate_over_seeds(trials, keys, "test_acc")}
    epochs = {key(p): p["values"] for p in aggregate_over_seeds(trials, keys, "epochs")}  # each seed's, where known
    rows = []
    for place, p in enumerate(points):
        row = {**{k: p.get(k) for k in keys}, "n": p["n"], "epochs": _epochs_text(epochs.get(p["key"], [])),
               "val_acc % (mean ± std)": _mean_std(p, 100.0), f"{100 * CONFIDENCE:.0f}% CI (t)": _interval(p),
               VERSUS_BEST: _versus_best(p, points[0], place, epochs)}
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


# --- Figures (matplotlib, Agg; imported here so the rest of the package does not need it) ---

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colors(labels: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    distinct = list(dict.fromkeys(labels))
    cmap = plt.get_cmap("tab10" if len(distinct) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(distinct)}


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")  # long trial labels stay inside the image
    _pyplot().close(fig)
    return path


def plot_ranking(trials, metric: str, mode: str, path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(trials) + 1.5))
    labels = [t["label"] for t in trials]
    values = [t["best_metric"] if t["best_metric"] is not None else 0.0 for t in trials]
    colors = ["tab:orange" if t.get("test_acc") is not None else "tab:blue" for t in trials]
    ax.barh(range(len(trials)), values, color=colors)
    ax.set_yticks(range(len(trials)), labels, fontsize=8)
    ax.invert_yaxis()  # best on top
    for i, t in enumerate(trials):
        note = _cell(t["best_metric"], "best_metric") + (f"  test_acc {t['test_acc']:.4f}"
                                                         if t.get("test_acc") is not None else "")
        ax.text(values[i], i, " " + note, va="center", fontsize=8)
    ax.set_xlabel(f"best {metric} ({mode}); orange: evaluated on test (after the ranking, never choosing)")
    ax.set_title("Trial ranking, best first")
    ax.margins(x=0.3)
    return _save(fig, path)


def generations(curve: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A trial's rows (by epoch) cut where its PBT generation changes: after an exploit a member trains on from its
    donor's state, so a line joining its generations reads as progress of its own. One piece for other studies."""
    pieces: list[list[dict[str, Any]]] = []
    for r in curve:
        if not pieces or (r.get("pbt_generation") or 0) != (pieces[-1][-1].get("pbt_generation") or 0):
            pieces.append([])
        pieces[-1].append(r)
    return pieces


def plot_curves(rows, trials, path: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = _colors([t["point"] for t in trials])
    by_trial = {}
    for r in rows:
        by_trial.setdefault(r.get("trial_id"), []).append(r)
    shown = set()
    for t in trials:
        curve = sorted(by_trial.get(t["trial_id"], []), key=lambda r: r.get("epoch") or 0)
        label = t["point"] if t["point"] not in shown else None
        shown.add(t["point"])
        for ax, key in zip(axes, ("val_acc", "train_loss")):
            for n, generation in enumerate(generations(curve)):
                points = [(r["epoch"], metric_value(r, key)) for r in generation if metric_value(r, key) is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", ms=3, color=colors[t["point"]],
                            label=label if key == "val_acc" and n == 0 else None)
    from matplotlib.ticker import MaxNLocator

    for ax, key in zip(axes, ("val_acc", "train_loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title("Validation accuracy (one line per trial)")
    above = _clip_diverging(axes[1], rows)
    axes[1].set_title("Train loss" + (f" ({above} epoch(s) of diverging trials above the axis)" if above else ""))
    fig.legend(loc="lower center", ncol=min(3, max(1, len(shown))), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.subplots_adjust(bottom=0.25)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


LOSS_AXIS_FIRSTS = 3.0  # the train-loss axis ends at this many times the median first-epoch loss, if a loss is past


def _clip_diverging(ax, rows) -> int:
    """A diverging trial's last finite losses (1e27 before its NaN) set the axis, and every other trial's curve lay
    flat along its foot: the axis ends at LOSS_AXIS_FIRSTS x the trials' median first-epoch loss instead (a trial
    that learns stays below its first epoch's). How many epochs are above it."""
    first: dict[Any, dict[str, Any]] = {}
    for r in rows:
        if (r.get("epoch") or 0) < (first.get(r.get("trial_id"), {}).get("epoch") or math.inf):
            first[r.get("trial_id")] = r
    firsts = [v for r in first.values() for v in [metric_value(r, "train_loss")] if v is not None and math.isfinite(v)]
    if not firsts or statistics.median(firsts) <= 0:
        return 0
    top = LOSS_AXIS_FIRSTS * statistics.median(firsts)
    above = sum(v is not None and math.isfinite(v) and v > top for v in (metric_value(r, "train_loss") for r in rows))
    if above:
        ax.set_ylim(0, top)
    return above


def hyperband_brackets(max_t: float, reduction_factor: float) -> list[tuple[int, list[int]]]:
    """BOHB's HyperBand brackets as ray_cifar's BOHBHyperBand makes them, in the order it fills them (a bracket
    takes trials until full, then the next): (places, milestones in epochs, the last max_t)."""
    eta = float(reduction_factor)
    if max_t < 1 or eta <= 1:
        return []
    s_max_1 = int(round(math.log(max_t) / math.log(eta))) + 1
    brackets = []
    for s in range(s_max_1 - 1, -1, -1):
        milestone = max(1, math.ceil(max_t / eta ** s - 1e-9))  # (scheduler.first_milestone)
        milestones = [milestone]
        for _ in range(s):
            milestone = int(min(milestone * eta, max_t))
            milestones.append(milestone)
        brackets.append((int(math.ceil(s_max_1 / (s + 1) * eta ** s)), milestones))
    return brackets


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


ONE_RUN = "one run"  # Study.tune's scheduler for a train run's output
SCHEDULER_KEYS = ("scheduler", "search", "grace_period", "reduction_factor", "time_attr", "brackets", "max_epochs")


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
        factor = _fmt(tune.get("reduction_factor") or 3)
        return (f"BOHB's HyperBand, reduction {factor}, max {max_t:g}: brackets filled in turn, the best 1/{factor} "
                f"going on at each milestone ({each}; drawn: the first's)")
    if scheduler in ("pbt", "pb2"):
        return f"{scheduler}: no trial stops early; the weak copy the strong (the population figure below)"
    if scheduler != "asha":
        return f"{scheduler}: no rungs"
    if tune.get("time_attr", "epoch") != "epoch":
        detail = (f"rungs every x{_fmt(tune.get('reduction_factor'))} from {_fmt(tune.get('grace_period'))} optimizer "
                  f"steps")
    else:
        rungs = asha_rungs(tune, max_t)
        detail = (f"grace {_fmt(tune.get('grace_period'))}, reduction {_fmt(tune.get('reduction_factor'))}, "
                  f"rungs at {', '.join(f'{r:g}' for r in rungs)}, max {max_t:g}")
    if (tune.get("brackets") or 1) > 1:
        detail += f"; {tune['brackets']} brackets (drawn: the first's)"
    return f"asha: {detail}"


def stops_text(tune: dict[str, Any], max_t: float) -> str:
    """scheduler_text; for a comparison of studies whose schedulers differ (_combine), each study's."""
    if tune.get("scheduler") == "mixed":
        own = tune["max_t_by_study"]
        return "; ".join(f"{name}: {scheduler_text(t, own[name])}" for name, t in tune["per_study"].items())
    return scheduler_text(tune, max_t)


def plot_asha(trials, tune: dict[str, Any], max_t: float, path: str) -> str:
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(trials) + 1.8))
    status_color = {"completed": "tab:green", "stopped": "tab:gray", "diverged": "tab:red", "failed": "black",
                    "lost": "tab:orange", "running": "tab:blue"}  # running: unfinished, in a study stopped
    ax.barh(range(len(trials)), [t["epochs"] or 0 for t in trials],
            color=[status_color.get(t.get("status"), "tab:blue") for t in trials])
    ax.set_yticks(range(len(trials)), [t["label"] for t in trials], fontsize=8)
    ax.invert_yaxis()
    if tune.get("scheduler") == "mixed":  # a comparison: each trial's own study's rungs and max, on its bar
        for i, t in enumerate(trials):
            name = t.get(STUDY_COLUMN)
            own, own_max = tune["per_study"].get(name, {}), tune["max_t_by_study"].get(name, max_t)
            for rung in asha_rungs(own, own_max):
                ax.plot([rung, rung], [i - 0.45, i + 0.45], color="tab:red", ls="--", lw=1)
            ax.plot([own_max, own_max], [i - 0.45, i + 0.45], color="black", lw=1)
    else:
        for rung in asha_rungs(tune, max_t):
            ax.axvline(rung, color="tab:red", ls="--", lw=1)
        ax.axvline(max_t, color="black", lw=1)
    seen = [s for s in status_color if any(t.get("status") == s for t in trials)]
    handles = [Patch(color=status_color[s], label=s) for s in seen] or [Patch(color="tab:blue", label="no status yet")]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_xlabel("epochs run (dashed: " + ("the first bracket's milestones" if tune.get("search") == "bohb"
                                            else "ASHA rungs") + "; solid: max)")
    ax.set_title(f"Where each trial stopped ({stops_text(tune, max_t)})", fontsize=10, wrap=True)
    return _save(fig, path)


def _axis_values(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numbers stay numbers (log axis chosen by the caller); anything else becomes ordered categories."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    cats = sorted({_fmt(v) for v in values})
    return [float(cats.index(_fmt(v))) for v in values], cats


def plot_params(trials, keys: list[str], path: str) -> str:
    plt = _pyplot()
    # A field with one value over all trials (e.g. cut by --smoke-test) says nothing: left out.
    points = aggregate_over_seeds(trials, keys, "val_acc")  # a point: every searched value but the seed
    shown = [k for k in keys if len({_fmt(t.get(k)) for t in trials}) > 1] or keys[:1] or ["(none)"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.8), squeeze=False)
    longest = max((t.get("epochs") or 0 for t in trials), default=0)
    short = [(t.get("epochs") or 0) < longest for t in trials]  # ASHA stopped them (or they diverged) earlier
    for ax, key in zip(axes[0], shown):
        xs, cats = _axis_values([t.get(key) for t in trials])
        ys = [100 * t["val_acc"] if t.get("val_acc") is not None else None for t in trials]  # None: no score
        for fewer, label, face in ((False, f"trials of {longest} epochs", "tab:gray"),
                                   (True, "trials of fewer epochs (stopped early)", "none")):
            picked = [(x, y) for x, y, s in zip(xs, ys, short) if s == fewer and y is not None]
            if picked:
                ax.scatter(*zip(*picked), s=14, facecolors=face, edgecolors="tab:gray", alpha=0.7, label=label)
        px, _ = _axis_values([p.get(key) for p in points]) if cats is None else (
            [float(cats.index(_fmt(p.get(key)))) for p in points], cats)
        drawn = [(x, p) for x, p in zip(px, points) if p["mean"] is not None]  # a point of no score (diverged): none
        ax.errorbar([x for x, _ in drawn], [100 * p["mean"] for _, p in drawn],
                    yerr=[100 * (p["std"] or 0) for _, p in drawn], fmt="o", color="tab:blue", capsize=4,
                    label="mean ± std over seeds")
        if cats is not None:
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=8)
        elif xs and min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("val_acc % at the best epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Accuracy against each searched field")
    return _save(fig, path)


def varying_fields(trials, keys: list[str]) -> list[str]:
    """The searched fields that take more than one value over the trials."""
    return [k for k in keys if len({_fmt(t.get(k)) for t in trials}) > 1]


def heatmap_pairs(trials, keys: list[str]) -> list[tuple[str, str]]:
    """Pairs of searched fields worth a heatmap, the most cells first (at most MAX_HEATMAPS): a field that is a
    relabelling of an earlier one (optim.weight_decay set with each optim.name) is left out, and so is a pair
    where one field fixes the other (a lr searched per optimizer: no cross to show)."""
    import itertools

    values = lambda k: [_fmt(t.get(k)) for t in trials]  # noqa: E731
    fields: list[str] = []
    for key in varying_fields(trials, keys):
        combos = lambda other: len(set(zip(values(other), values(key))))  # noqa: E731
        if not any(combos(f) == len(set(values(f))) == len(set(values(key))) for f in fields):
            fields.append(key)
    pairs = [(a, b, len(set(zip(values(a), values(b))))) for a, b in itertools.combinations(fields, 2)]
    pairs = [p for p in pairs if p[2] > max(len(set(values(p[0]))), len(set(values(p[1]))))]
    return [(a, b) for a, b, _ in sorted(pairs, key=lambda p: -p[2])][:MAX_HEATMAPS]


def plot_heatmap(trials, keys: list[str], path: str) -> str:
    """Mean val_acc (%) for each pair of values of two searched fields, averaged over seeds and over the
    other fields; each cell says its n. Blank: no trial has that pair."""
    plt = _pyplot()
    pairs = heatmap_pairs(trials, keys)
    if not pairs:
        fig, ax = plt.subplots(figsize=(6, 0.8))
        ax.text(0.5, 0.5, "no two searched fields cross each other: no pair to draw", ha="center", va="center",
                fontsize=9)
        ax.set_axis_off()
        return _save(fig, path)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.8 * len(pairs), 4.2), squeeze=False)
    longest = max((t.get("epochs") or 0 for t in trials), default=0)
    for ax, (row_key, col_key) in zip(axes[0], pairs):
        rows_, cols = _ordered_values(trials, row_key), _ordered_values(trials, col_key)
        cells = {(_fmt(p[row_key]), _fmt(p[col_key])): p for p in aggregate_over_seeds(trials, [row_key, col_key], "val_acc")}
        epochs = {(_fmt(p[row_key]), _fmt(p[col_key])): p["values"]
                  for p in aggregate_over_seeds(trials, [row_key, col_key], "epochs")}
        grid = [[100 * cells[(r, c)]["mean"] if cells.get((r, c), {}).get("mean") is not None else math.nan
                 for c in cols] for r in rows_]
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i, r in enumerate(rows_):
            for j, c in enumerate(cols):
                cell = cells.get((r, c))
                if cell and cell["mean"] is not None:
                    ran = epochs.get((r, c)) or []
                    fewer = f"\n{_epochs_text(ran)} ep" if ran and min(ran) < longest else ""
                    ax.text(j, i, f"{100 * cell['mean']:.1f}\nn={cell['n']}{fewer}", ha="center", va="center",
                            fontsize=8, color="white" if grid[i][j] < _middle(grid) else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=20, fontsize=8)
        ax.set_yticks(range(len(rows_)), rows_, fontsize=8)
        ax.set_xlabel(col_key)
        ax.set_ylabel(row_key)
        fig.colorbar(image, ax=ax, label="mean val_acc %")
    fig.suptitle("Mean val_acc % at the best epoch, two searched fields at a time (over seeds and the other fields)")
    return _save(fig, path)


def _ordered_values(trials, key: str) -> list[str]:
    values = list({_fmt(t.get(key)): t.get(key) for t in trials}.items())
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for _, v in values)
    return [label for label, v in sorted(values, key=lambda lv: lv[1] if numeric else lv[0])]


def _middle(grid: list[list[float]]) -> float:
    finite = [v for row in grid for v in row if not math.isnan(v)]
    return (min(finite) + max(finite)) / 2 if finite else 0.0


def plot_throughput(rows, trials, path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(trials) + 1.5))
    speeds = []
    for t in trials:
        values = [v for r in rows if r.get("trial_id") == t["trial_id"]
                  for v in [metric_value(r, "images_per_second")] if v is not None]
        speeds.append(statistics.median(values) if values else 0.0)  # the median: the first epoch warms up
    ax.barh(range(len(trials)), speeds, color="tab:purple")
    ax.set_yticks(range(len(trials)), [t["label"] for t in trials], fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(speeds):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xlabel("training images/s (median over epochs, all ranks)")
    ax.set_title("Throughput per trial")
    ax.margins(x=0.15)
    return _save(fig, path)


def plot_published(matches, path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(matches) + 1.5 if matches else 0.6))
    if not matches:
        ax.text(0.5, 0.5, "no trial ran at a published entry's values (a shortened or smoke run changes them)",
                ha="center", va="center", fontsize=9)
        ax.set_axis_off()
        return _save(fig, path)
    ys = range(len(matches))
    ax.barh([y - 0.2 for y in ys], [m["published %"] for m in matches], height=0.4, color="tab:gray", label="published")
    ax.barh([y + 0.2 for y in ys], [m["ours %"] or 0 for m in matches], height=0.4, color="tab:blue", label="this run")
    ax.set_yticks(list(ys), [f"{m['label']}\n({m['metric']})" for m in matches], fontsize=8)
    ax.invert_yaxis()
    values = [v for m in matches for v in (m["published %"], m["ours %"]) if v is not None]
    low = max(0.0, min(values) - 10)  # the differences that matter are a few points
    for y, m in zip(ys, matches):
        ax.text(m["published %"], y - 0.2, f" {m['published %']:.2f}", va="center", fontsize=7)
        ours = f" {m['ours %']:.2f}" if m["ours %"] is not None else " not measured (tune.test best: the best trial only)"
        ax.text(m["ours %"] if m["ours %"] is not None else low, y + 0.2, ours, va="center", fontsize=7)
    ax.set_xlim(low, 100)
    ax.set_xlabel("accuracy %")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Each run beside its published figure")
    return _save(fig, path)


# --- The report ---

def lineage_studies(rows) -> set:
    """The studies whose trials PBT or PB2 made: their names in a comparison ({None}: the one study is)."""
    return {r.get(STUDY_COLUMN) for r in rows if r.get("pbt_generation") is not None}


LINEAGE_FIGURES = ("params", "heatmap")  # left out of a PBT or PB2 report: NO_POINTS_NOTE says why
NO_POINTS_WHY = ("PBT changes a member's values at each exploit, and the member trains on from its donor's state: "
                 "no trial ran at one point of the search space, and no two are independent replicates.")
NO_POINTS_NOTE = (f"{NO_POINTS_WHY} So this report has no replicates table, and no accuracy-against-field figures or "
                  "heatmaps. A trial's searched values are the ones in force at its best epoch. The schedule below, "
                  "and the last figure, show the values epoch by epoch.")


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


def plot_pbt(rows, keys: list[str], metric: str, path: str) -> str:
    """PBT: each member's values over epochs (one panel per searched field that changed) and tune.metric,
    with an arrow from the donor's epoch to the member's first epoch after each exploit: who copied whom."""
    plt = _pyplot()
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r.get("epoch") or 0):
        by_trial.setdefault(r["trial_id"], []).append(r)
    changed = [k for k in keys if any(len({_fmt(r.get(k)) for r in rs}) > 1 for rs in by_trial.values())]
    panels = changed + [metric]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.8 * len(panels)), sharex=True, squeeze=False)
    colors = _colors(list(by_trial))
    for ax, key in zip(axes[:, 0], panels):
        numeric = all(isinstance(r.get(key), (int, float)) for rs in by_trial.values() for r in rs if r.get(key) is not None)
        for tid, rs in by_trial.items():
            if not numeric:
                continue
            draw = ax.plot if key == metric else (lambda *a, **k: ax.step(*a, where="post", **k))  # values hold an epoch
            for n, generation in enumerate(generations(rs)):  # the arrow joins them, from the donor
                points = [(r["epoch"], r[key]) for r in generation if r.get(key) is not None]
                if points:
                    draw(*zip(*points), marker="o", ms=3, color=colors[tid],
                         label=tid if key == panels[0] and n == 0 else None)
            for prev, r in zip(rs, rs[1:]):
                if (r.get("pbt_generation") or 0) > (prev.get("pbt_generation") or 0) and r.get(key) is not None:
                    donor = {d["epoch"]: d for d in by_trial.get(r.get("pbt_parent"), [])}.get(r.get("resumed_from_epoch"))
                    if donor is not None and donor.get(key) is not None:
                        ax.annotate("", xy=(r["epoch"], r[key]), xytext=(donor["epoch"], donor[key]),
                                    arrowprops={"arrowstyle": "->", "color": colors[tid], "lw": 1.2})
        if numeric and key.startswith(("optim.lr", "optim.weight_decay")):
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("Each member's values over epochs; arrows: an exploit, from the donor's epoch to the member")
    axes[-1, 0].set_xlabel("epoch")
    fig.legend(loc="lower center", ncol=min(4, max(1, len(by_trial))), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.subplots_adjust(bottom=0.12)
    return _save(fig, path)


def _combine(studies: list[Study]) -> Study:
    """Several outputs as one study whose trials carry a 'study' column (the output's folder name)."""
    if len(studies) == 1:
        return studies[0]

    def tag(s: Study, r: dict[str, Any]) -> dict[str, Any]:
        tagged = {STUDY_COLUMN: s.name, **r, "trial_id": f"{s.name}/{r.get('trial_id')}"}
        if r.get("pbt_parent"):  # a donor is a trial of the same study: named as the trial ids now are
            tagged["pbt_parent"] = f"{s.name}/{r['pbt_parent']}"
        return tagged

    first = studies[0]
    config = dict(first.config)
    # Each study's own tune section and length: the first's spoke for all of them (its tune.test for every trial's
    # test figure; its rungs, where schedulers or lengths differ, for every study's stops: a 4-epoch study's "rungs
    # at 1, 2, 4, max 6", from a 6-epoch study beside it).
    max_t = {s.name: study_max_epochs(s, s.trials) for s in studies}
    schedulers = {tuple(repr(s.tune.get(k)) for k in SCHEDULER_KEYS) for s in studies}
    mixed = len(schedulers) > 1 or len(set(max_t.values())) > 1
    config["tune"] = {**first.tune, "per_study": {s.name: s.tune for s in studies}, "max_t_by_study": max_t,
                      **({"scheduler": "mixed"} if mixed else {})}
    config["published"] = [{**p, "where": {STUDY_COLUMN: s.name, **(p.get("where") or {})}}
                           for s in studies for p in s.config.get("published") or []]
    # A field one study searched and another fixed: the other's rows get its fixed value from its config (shown as
    # missing, "-", it read as unknown), where the config has it.
    keys = searched_columns([r for s in studies for r in s.rows], with_seed=True)
    fixed = {s.name: {k: v for k, v in flatten(s.config).items() if k in keys and isinstance(v, (int, float, str, bool))}
             for s in studies}
    fill = lambda s, r: {**{k: v for k, v in fixed[s.name].items() if k not in r}, **r}  # noqa: E731
    return Study(name=" vs ".join(s.name for s in studies), config=config,
                 rows=[tag(s, fill(s, r)) for s in studies for r in s.rows],
                 trials=[tag(s, fill(s, t)) for s in studies for t in s.trials],
                 unfinished=any(s.unfinished for s in studies),
                 last_phase_cut=any(s.last_phase_cut for s in studies))


def study_max_epochs(study: Study, trials: list[dict[str, Any]]) -> float:
    """ASHA's max_t as the study set it: tune.max_epochs, else train.epochs; with train.max_steps the
    epochs follow from the batch size, so the longest planned or run trial."""
    train = study.config.get("train") or {}
    if study.tune.get("max_epochs"):
        return float(study.tune["max_epochs"])
    planned = [t.get("planned_epochs") or 0 for t in study.trials]
    if train.get("max_steps") is None and train.get("epochs"):  # or a trial's own, longer, searched train.epochs
        return float(max([train["epochs"]] + planned))
    return float(max(planned + [t["epochs"] or 0 for t in trials] + [1]))


def build(study: Study, out_dir: str, prefix: str = "") -> dict[str, Any]:
    """Every figure under out_dir/<prefix>figures/ and the tables; returns what the page shows."""
    fig_dir = os.path.join(out_dir, f"{prefix}figures")
    os.makedirs(fig_dir, exist_ok=True)
    keys = searched_columns(study.rows)
    if any(STUDY_COLUMN in r for r in study.rows):
        keys = [STUDY_COLUMN] + keys
    trials = summaries(study)
    for t in trials:
        t["point"] = point_label(t, keys)
        seed = f" seed={t[SEED_KEY]}" if t.get(SEED_KEY) is not None else ""
        t["label"] = t["point"] + seed
    max_t = study_max_epochs(study, trials)
    matches = match_published(study, trials)
    p = lambda name: os.path.join(fig_dir, f"{name}.png")  # noqa: E731
    plot_ranking(trials, study.metric, study.mode, p("ranking"))
    plot_curves(study.rows, trials, p("curves"))
    if not study.one_run:
        plot_asha(trials, study.tune, max_t, p("asha"))
    # A point of the search space means something only where no PBT made the trials (NO_POINTS_NOTE): in a
    # comparison of a PBT study with a grid, the grid's points still are (the PBT study's trials left out of them).
    pbt = lineage_studies(study.rows)
    # (One trial of nothing searched, a train run: no point to draw against a field, nor replicates.)
    points = [t for t in trials if t.get(STUDY_COLUMN) not in pbt] if keys or len(trials) > 1 else []
    if points:
        plot_params(points, keys, p("params"))
        plot_heatmap(points, keys, p("heatmap"))
    plot_throughput(study.rows, trials, p("throughput"))
    published = bool(study.config.get("published"))  # none in config.yaml: no section that says so in a figure
    if published:
        plot_published(matches, p("published"))
    figures = {n: f"{prefix}figures/{n}.png" for n in FIGURES
               if (points or n not in LINEAGE_FIGURES) and (published or n != "published")
               and not (study.one_run and n == "asha")}  # (no scheduler stopped a train run)
    best_pbt = next((t for t in trials if t.get(STUDY_COLUMN) in pbt), None)
    if pbt:
        plot_pbt([r for r in study.rows if r.get(STUDY_COLUMN) in pbt], keys, study.metric, p("pbt"))
        figures["pbt"] = f"{prefix}figures/pbt.png"
    columns = ["trial_id", *keys, SEED_KEY, "status", "epochs", "exploits", "best_epoch", "best_metric", "val_acc",
               "test_acc"]
    columns = [c for c in dict.fromkeys(columns) if any(c in t for t in trials)]
    return {"trials": trials, "columns": columns, "keys": keys, "matches": matches, "lineage": sorted(pbt, key=str),
            "points": bool(points), "replicates": replicate_rows(points, keys) if points else [],
            "best_pbt": best_pbt,
            "schedule": schedule_rows(study.rows, best_pbt, [k for k in keys if k != STUDY_COLUMN],  # in its ids
                                      study.metric) if best_pbt else [],
            "figures": figures,
            "captions": {"asha": f"What stopped trials early: {stops_text(study.tune, max_t)}.",
                         **({"params": FEWER_EPOCHS_CAPTION, "heatmap": FEWER_EPOCHS_CAPTION}
                            if len({t.get("epochs") for t in points}) > 1 else {}),
                         **({} if matches or not published else {"published": NO_MATCH_CAPTION})}}


SECTIONS = (("ranking", "Trial ranking"), ("curves", "Learning curves"), ("asha", "Where the scheduler stopped each trial"),
            ("params", "Accuracy against each searched field"),
            ("heatmap", "Mean accuracy, two searched fields at a time"), ("throughput", "Images/s per trial"),
            ("published", "Beside the published figures"),
            ("pbt", "Population based training: each member's schedule, and who copied whom"))


@dataclass
class TableSection:
    """A titled table with its notes: what both report.md and report.html show, in order."""

    title: str
    notes: list[str]
    rows: list[dict[str, Any]]
    columns: list[str]


def _headline(study: Study, built: dict[str, Any]) -> str:
    best = built["trials"][0] if built["trials"] else {}
    return (f"Ranked by `{study.metric}` ({study.mode}); best trial `{best.get('trial_id', '-')}` "
            f"({_cell(best.get('best_metric'), 'best_metric')} at epoch {_fmt(best.get('best_epoch'))}, "
            f"test_acc {_cell(best.get('test_acc'), 'test_acc')}).")


def _test_note(study: Study) -> str | None:
    """What has a test figure, where any trial but the best has one: TEST_ALL_NOTE, or per study in a comparison
    of studies whose tune.test differs."""
    by_study = {name: tune.get("test", "best")
                for name, tune in (study.tune.get("per_study") or {study.name: study.tune}).items()}
    every = [name for name, test in by_study.items() if test == "all"]
    if not every:
        return None
    if len(every) == len(by_study):
        return TEST_ALL_NOTE
    best = [name for name in by_study if name not in every]
    return (f"test_acc: every finished trial of {', '.join(every)} was evaluated once on the test split, at its best "
            f"validation epoch (tune.test all); of {', '.join(best)}, the best trial only (tune.test best). No test "
            f"figure chose any trial, epoch or point.")


FEWER_EPOCHS_CAPTION = ("Each trial at its best epoch of those it ran: a trial stopped early (hollow; a cell's \"ep\" "
                        "says its trials' epochs) is at its best of fewer epochs than the others, so a gap here is "
                        "budget as much as values. The replicates table compares only points of equal epochs.")
LAST_PHASE_CUT_NOTE = ("**Not finished**: the study was stopped in its last phase, the test evaluation (no "
                       "study-finished.json): every trial is here, but a test figure \"-\" may be one that never ran. "
                       "`python -m ray_cifar.tune --resume {location}` runs that phase again.")
NO_MATCH_CAPTION = ("No trial ran at the values of a published entry (config.yaml's `published`, each matched by all "
                    "of its `where`): a --smoke-test or --budget-scale run changes lengths, batch sizes and grids, so "
                    "its trials are not the published runs.")
def _last_phase_note(study: Study) -> str:
    return LAST_PHASE_CUT_NOTE.format(location=shlex.quote(study.location))


TEST_BEST_NOTE = ("tune.test best: only the best trial has a test figure (evaluated once, after the study); tune.test "
                  "all puts one beside every finished trial.")


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


VAL_Z = 1.96  # the normal quantile of a two-sided 95% interval


def trials_section(study: Study, built: dict[str, Any]) -> TableSection:
    note = _last_phase_note(study) if study.last_phase_cut else (
        _test_note(study) or (TEST_BEST_NOTE if len(built["trials"]) > 1 else None))
    noise = val_noise_note(study, built["trials"])
    notes = [_headline(study, built)] + ([note] if note else []) + ([noise] if noise else [])
    if study.unfinished:
        running = sum(t.get("status") == "running" for t in study.trials)
        notes.insert(0, f"**Not finished**: the study has no trials.parquet yet (running, or stopped before its end: "
                        f"`python -m ray_cifar.tune --resume {shlex.quote(study.location)}` goes on with it). "
                        f"{len(study.trials)} trial(s) "
                        f"so far, {running} of them unfinished; trials not started yet are not here, and no trial has "
                        f"a test figure.")
    return TableSection("Trials", notes, built["trials"], built["columns"])


def replicates_section(study: Study, built: dict[str, Any]) -> TableSection | None:
    if not built["points"]:
        return None  # no points, no replicates: NO_POINTS_NOTE, with the schedule
    rows = built["replicates"]
    notes = [NOISE_NOTE]
    if built["lineage"]:
        notes.append(f"The trials of {', '.join(map(str, built['lineage']))} are not here: PBT made them (the "
                     f"schedule above says why).")
    return TableSection("Replicates (val_acc at the best epoch, over train.seed)", notes, rows,
                        list(rows[0]) if rows else [])


def schedule_section(study: Study, built: dict[str, Any]) -> TableSection | None:
    best = built["best_pbt"]
    if best is None:
        return None
    rows = built["schedule"]
    which = "the best" if best is (built["trials"] or [None])[0] else "the best that PBT made"
    lead = (f"PBT's result is a schedule. These values, epoch by epoch, trained trial {best.get('trial_id')}'s "
            f"epoch {_fmt(best.get('best_epoch'))}, {which}; each earlier generation on the way was trained by the "
            f"member whose state it copied.")
    why = NO_POINTS_NOTE if not built["points"] else (
        f"{NO_POINTS_WHY} So the replicates table and the accuracy-against-field figures and heatmaps leave out the "
        f"trials of {', '.join(map(str, built['lineage']))}; the last figure shows their values epoch by epoch.")
    return TableSection("The best trial's schedule", [lead, why], rows, list(rows[0]) if rows else [])


def published_section(study: Study, built: dict[str, Any]) -> TableSection | None:
    if not built["matches"]:
        return None
    notes = [_last_phase_note(study) if study.last_phase_cut else (_test_note(study) or TEST_BEST_NOTE)]
    return TableSection("Published figures", notes, built["matches"],
                        ["label", "metric", "published %", "ours %", "source"])


# The tables, in order: each a function (study, built) -> TableSection or None (nothing to show).
TABLE_SECTIONS = (trials_section, schedule_section, replicates_section, published_section)


def table_sections(study: Study, built: dict[str, Any]) -> list[TableSection]:
    return [t for t in (make(study, built) for make in TABLE_SECTIONS) if t is not None]


def _markdown(study: Study, built: dict[str, Any]) -> str:
    lines = [f"# Study report: {study.name}", ""]
    for i, t in enumerate(table_sections(study, built)):
        lines += ([] if i == 0 else [f"## {t.title}", ""]) + [n for note in t.notes for n in (note, "")]
        lines += [markdown_table(t.rows, t.columns), ""]
    for name, title in [(n, t) for n, t in SECTIONS if n in built["figures"]]:
        caption = built.get("captions", {}).get(name)
        lines += [f"## {title}", "", *([caption, ""] if caption else []), f"![{title}]({built['figures'][name]})", ""]
    return "\n".join(lines)


def _html(study: Study, built: dict[str, Any]) -> str:
    parts = [f"<h1>Study report: {html.escape(study.name)}</h1>"]
    for i, t in enumerate(table_sections(study, built)):
        parts += ([] if i == 0 else [f"<h2>{html.escape(t.title)}</h2>"])
        parts += [f"<p>{html.escape(note).replace('`', '')}</p>" for note in t.notes]
        parts += [html_table(t.rows, t.columns)]
    for name, title in [(n, t) for n, t in SECTIONS if n in built["figures"]]:
        caption = built.get("captions", {}).get(name)
        parts += [f"<h2>{html.escape(title)}</h2>", *([f"<p>{html.escape(caption)}</p>"] if caption else []),
                  f'<img src="{built["figures"][name]}" alt="{html.escape(title)}">']
    style = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
             "th{background:#eee}img{max-width:100%;border:1px solid #eee}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(study.name)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(outputs: list[str], out_dir: str | None = None, named: list[str] | None = None) -> str:
    """Write report.html, report.md and figures/ for one output (into it), or compare-report.* and
    compare-figures/ for several (into out_dir, default the first output). NAMED: the outputs as their user names
    them (a bucket's URI, where OUTPUTS holds its local copy), for the commands the notes give. Returns the HTML
    path."""
    studies = [load_study(o) for o in outputs]
    for s, name in zip(studies, named or outputs):
        s.location = name
    study = _combine(studies)
    out_dir = out_dir or outputs[0]
    os.makedirs(out_dir, exist_ok=True)
    prefix = "" if len(studies) == 1 else "compare-"
    built = build(study, out_dir, prefix)
    with open(os.path.join(out_dir, f"{prefix}report.md"), "w") as f:
        f.write(_markdown(study, built))
    html_path = os.path.join(out_dir, f"{prefix}report.html")
    with open(html_path, "w") as f:
        f.write(_html(study, built))
    return html_path


def _fetched(output: str, into: str) -> str:
    """A study output as a local folder: a bucket's (s3://, gs://) files copied into `into`/NAME, Ray's own left
    there (checkpoints: the report reads none); a folder as it is."""
    if storage.local_path(output) is not None:
        return output
    local = os.path.join(into, str(len(os.listdir(into))), os.path.basename(output.rstrip("/")))
    storage.sync_down(output, local)
    return local


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_cifar.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", metavar="OUTPUT",
                        help="a study's output folder or s3:// gs:// URI (several: a comparison)")
    parser.add_argument("--out", default=None, help="folder for the report (default: the first OUTPUT; for a URI, "
                                                    "NAME-report in the current folder)")
    args = parser.parse_args(argv)
    first = args.outputs[0]
    out = args.out or (None if storage.local_path(first) is not None else os.path.basename(first.rstrip("/")) + "-report")
    try:
        with tempfile.TemporaryDirectory(prefix="ray_cifar-report-") as fetched:
            path = write_report([_fetched(o, fetched) for o in args.outputs], out, named=args.outputs)
    except (NotAStudyOutput, DamagedFile, storage.StorageError, OSError) as e:  # each names the file or location
        study = shlex.quote(first) if len(args.outputs) == 1 else "OUTPUT"
        remedy = (f"; python -m ray_cifar.tune --resume {study} rebuilds it (the rows from the trials' checkpoints, "
                  f"trials.parquet from trials.json)" if isinstance(e, DamagedFile) else "")
        print(f"ray_cifar.report: error: {e}{remedy}", file=sys.stderr)
        return 2
    print(f"[ray_cifar] report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
