"""The report's figures, one PNG each (matplotlib, Agg; imported only when drawn, so the rest of the package does not
need it)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

from ..results import aggregate_over_seeds, metric_value
from .schedulers import asha_rungs, stops_text
from .study import STUDY_COLUMN
from .tables import BUDGET, cell, epochs_text, fmt, length, longest_epochs, ran_fewer

FIGURES = ("ranking", "curves", "asha", "params", "heatmap", "throughput", "published")
MAX_HEATMAPS = 3  # pairs of searched fields drawn as heatmaps (those with the most cells)
# A figure of a bar per trial draws the best MAX_BARS (the trials table lists every one): a bar is 28 px, and a
# 400-trial study's three such figures were 11,000 px tall each; a 2,800-trial one's 78,000 px and 10 MB each, its
# report 2 min to draw (13 s now). Where each trial stopped is then drawn as counts of trials by epochs run.
MAX_BARS = 40
# Learning curves in colour, with a legend: the best trials' points, as many as the palette tells apart; the other
# trials' curves are grey (a legend of every point of a random search was taller than the curves).
MAX_COLOURED = 20
STATUS_COLOR = {"completed": "tab:green", "stopped": "tab:gray", "diverged": "tab:red", "failed": "black",
                "lost": "tab:orange", "running": "tab:blue"}  # running: unfinished, in a study stopped


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


def _of_all(shown: int, trials: int) -> str:
    """A per-trial figure's title's end where it draws the best `shown` of more trials."""
    return f": the best {shown} of {trials} trials (the trials table lists all)" if trials > shown else ""


def plot_ranking(trials, metric: str, mode: str, path: str) -> str:
    plt = _pyplot()
    everyone, trials = len(trials), trials[:MAX_BARS]  # ranked best first
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(trials) + 1.5))
    labels = [t["label"] for t in trials]
    values = [t["best_metric"] if t["best_metric"] is not None else 0.0 for t in trials]
    colors = ["tab:orange" if t.get("test_acc") is not None else "tab:blue" for t in trials]
    ax.barh(range(len(trials)), values, color=colors)
    ax.set_yticks(range(len(trials)), labels, fontsize=8)
    ax.invert_yaxis()  # best on top
    for i, t in enumerate(trials):
        note = cell(t["best_metric"], "best_metric") + (f"  test_acc {t['test_acc']:.4f}"
                                                         if t.get("test_acc") is not None else "")
        ax.text(values[i], i, " " + note, va="center", fontsize=8)
    ax.set_xlabel(f"best {metric} ({mode}); orange: evaluated on test (after the ranking, never choosing)")
    ax.set_title("Trial ranking, best first" + _of_all(len(trials), everyone))
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
    ranked = list(dict.fromkeys(t["point"] for t in trials))  # trials come best first
    colors = _colors(ranked[:MAX_COLOURED])
    by_trial = {}
    for r in rows:
        by_trial.setdefault(r.get("trial_id"), []).append(r)
    shown = set()
    grey = [t for t in trials if t["point"] not in colors]
    for t in grey + [t for t in trials if t["point"] in colors]:  # the coloured drawn over the grey
        curve = sorted(by_trial.get(t["trial_id"], []), key=lambda r: r.get("epoch") or 0)
        if t["point"] in colors:
            colour, style = colors[t["point"]], {"marker": "o", "ms": 3}
            label = t["point"] if t["point"] not in shown else None
        else:
            colour, style = "lightgrey", {"lw": 0.8}
            label = f"the other {len(ranked) - MAX_COLOURED} points" if t is grey[0] else None
        shown.add(t["point"])
        for ax, key in zip(axes, ("val_acc", "train_loss")):
            for n, generation in enumerate(generations(curve)):
                points = [(r["epoch"], metric_value(r, key)) for r in generation if metric_value(r, key) is not None]
                if points:
                    ax.plot(*zip(*points), color=colour, label=label if key == "val_acc" and n == 0 else None,
                            **style)
    from matplotlib.ticker import MaxNLocator

    for ax, key in zip(axes, ("val_acc", "train_loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title("Validation accuracy (one line per trial" + (f"; the best {MAX_COLOURED} points in colour)"
                                                                    if grey else ")"))
    above = _clip_diverging(axes[1], rows)
    axes[1].set_title("Train loss" + (f" ({above} epoch(s) of diverging trials above the axis)" if above else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: handles[i].get_color() == "lightgrey")  # the grey one last
    # Below the axes, hanging down: the saved image grows to hold it (bbox_inches="tight"), however many rows.
    fig.subplots_adjust(bottom=0.14)
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
               ncol=min(3, max(1, len(labels))), fontsize=8, bbox_to_anchor=(0.5, 0.02))
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


def plot_asha(trials, tune: dict[str, Any], max_t: float, path: str) -> str:
    if len(trials) > MAX_BARS:
        return _plot_stops_counted(trials, tune, max_t, path)
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(trials) + 1.8))
    ax.barh(range(len(trials)), [t["epochs"] or 0 for t in trials],
            color=[STATUS_COLOR.get(t.get("status"), "tab:blue") for t in trials])
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
        _rung_lines(ax, tune, max_t)
    seen = [s for s in STATUS_COLOR if any(t.get("status") == s for t in trials)]
    handles = [Patch(color=STATUS_COLOR[s], label=s) for s in seen] or [Patch(color="tab:blue", label="no status yet")]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_xlabel(f"epochs run (dashed: {_rungs_text(tune)}; solid: max)")
    ax.set_title(f"Where each trial stopped ({stops_text(tune, max_t)})", fontsize=10, wrap=True)
    return _save(fig, path)


def _rungs_text(tune: dict[str, Any]) -> str:
    return "the first bracket's milestones" if tune.get("search") == "bohb" else "ASHA rungs"


def _rung_lines(ax, tune: dict[str, Any], max_t: float) -> None:
    """The study's rungs (dashed) and its max (solid), across the axes."""
    for rung in asha_rungs(tune, max_t):
        ax.axvline(rung, color="tab:red", ls="--", lw=1)
    ax.axvline(max_t, color="black", lw=1)


def _plot_stops_counted(trials, tune: dict[str, Any], max_t: float, path: str) -> str:
    """plot_asha for many trials: how many stopped after each number of epochs, by status, stacked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    # None: a status this figure has no colour for, or none yet
    counted = Counter((t["epochs"] or 0, t.get("status") if t.get("status") in STATUS_COLOR else None)
                      for t in trials)
    lengths = sorted({e for e, _ in counted})
    below = dict.fromkeys(lengths, 0)
    for status in [*STATUS_COLOR, None]:
        counts = [counted[(e, status)] for e in lengths]
        if any(counts):
            ax.bar(lengths, counts, bottom=[below[e] for e in lengths], width=0.8,
                   color=STATUS_COLOR.get(status, "tab:blue"), label=status or "no status yet")
            below = {e: below[e] + c for e, c in zip(lengths, counts)}
    if tune.get("scheduler") != "mixed":  # a comparison's studies have rungs of their own: the caption gives them
        _rung_lines(ax, tune, max_t)
    ax.legend(fontsize=8)
    ax.set_xlabel("epochs run" + (f" (dashed: {_rungs_text(tune)}; solid: max)" if tune.get("scheduler") != "mixed"
                                  else ""))
    ax.set_ylabel("trials")
    ax.set_title(f"Where the {len(trials)} trials stopped ({stops_text(tune, max_t)})", fontsize=10, wrap=True)
    return _save(fig, path)


def _axis_values(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numbers stay numbers (log axis chosen by the caller); anything else becomes ordered categories."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    cats = sorted({fmt(v) for v in values})
    return [float(cats.index(fmt(v))) for v in values], cats


def plot_params(trials, keys: list[str], path: str, unit: str = "epochs") -> str:
    plt = _pyplot()
    # A field with one value over all trials (e.g. cut by --smoke-test) says nothing: left out.
    points = aggregate_over_seeds(trials, keys, "val_acc")  # a point: every searched value but the seed
    shown = [k for k in keys if len({fmt(t.get(k)) for t in trials}) > 1] or keys[:1] or ["(none)"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.8), squeeze=False)
    longest = longest_epochs(trials)
    short = ran_fewer(trials)
    for ax, key in zip(axes[0], shown):
        xs, cats = _axis_values([t.get(key) for t in trials])
        ys = [100 * t["val_acc"] if t.get("val_acc") is not None else None for t in trials]  # None: no score
        for fewer, label, face in ((False, f"trials of {longest:g} {unit}", "tab:gray"),
                                   (True, f"trials of fewer {unit} (stopped early)", "none")):
            picked = [(x, y) for x, y, s in zip(xs, ys, short) if s == fewer and y is not None]
            if picked:
                ax.scatter(*zip(*picked), s=14, facecolors=face, edgecolors="tab:gray", alpha=0.7, label=label)
        px, _ = _axis_values([p.get(key) for p in points]) if cats is None else (
            [float(cats.index(fmt(p.get(key)))) for p in points], cats)
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
    return [k for k in keys if len({fmt(t.get(k)) for t in trials}) > 1]


def heatmap_pairs(trials, keys: list[str]) -> list[tuple[str, str]]:
    """Pairs of searched fields worth a heatmap, the most cells first (at most MAX_HEATMAPS): a field that is a
    relabelling of an earlier one (optim.weight_decay set with each optim.name) is left out, and so is a pair
    where one field fixes the other (a lr searched per optimizer: no cross to show)."""
    import itertools

    values = lambda k: [fmt(t.get(k)) for t in trials]  # noqa: E731
    fields: list[str] = []
    for key in varying_fields(trials, keys):
        combos = lambda other: len(set(zip(values(other), values(key))))  # noqa: E731
        if not any(combos(f) == len(set(values(f))) == len(set(values(key))) for f in fields):
            fields.append(key)
    pairs = [(a, b, len(set(zip(values(a), values(b))))) for a, b in itertools.combinations(fields, 2)]
    pairs = [p for p in pairs if p[2] > max(len(set(values(p[0]))), len(set(values(p[1]))))]
    return [(a, b) for a, b, _ in sorted(pairs, key=lambda p: -p[2])][:MAX_HEATMAPS]


def plot_heatmap(trials, keys: list[str], path: str, unit: str = "epochs") -> str:
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
    longest = longest_epochs(trials)
    for ax, (row_key, col_key) in zip(axes[0], pairs):
        rows_, cols = _ordered_values(trials, row_key), _ordered_values(trials, col_key)
        cells = {(fmt(p[row_key]), fmt(p[col_key])): p for p in aggregate_over_seeds(trials, [row_key, col_key], "val_acc")}
        lengths = [{**t, BUDGET: length(t) or None} for t in trials]
        epochs = {(fmt(p[row_key]), fmt(p[col_key])): p["values"]
                  for p in aggregate_over_seeds(lengths, [row_key, col_key], BUDGET)}
        grid = [[100 * cells[(r, c)]["mean"] if cells.get((r, c), {}).get("mean") is not None else math.nan
                 for c in cols] for r in rows_]
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i, r in enumerate(rows_):
            for j, c in enumerate(cols):
                cell = cells.get((r, c))
                if cell and cell["mean"] is not None:
                    ran = epochs.get((r, c)) or []
                    fewer = f"\n{epochs_text(ran)} {'ep' if unit == 'epochs' else unit}" if ran and min(ran) < longest else ""
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
    values = list({fmt(t.get(key)): t.get(key) for t in trials}.items())
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for _, v in values)
    return [label for label, v in sorted(values, key=lambda lv: lv[1] if numeric else lv[0])]


def _middle(grid: list[list[float]]) -> float:
    finite = [v for row in grid for v in row if not math.isnan(v)]
    return (min(finite) + max(finite)) / 2 if finite else 0.0


def plot_throughput(rows, trials, path: str) -> str:
    plt = _pyplot()
    everyone, trials = len(trials), trials[:MAX_BARS]  # ranked best first
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
    ax.set_title("Throughput per trial" + _of_all(len(trials), everyone))
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


def plot_pbt(rows, keys: list[str], metric: str, path: str) -> str:
    """PBT: each member's values over epochs (one panel per searched field that changed) and tune.metric,
    with an arrow from the donor's epoch to the member's first epoch after each exploit: who copied whom."""
    plt = _pyplot()
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r.get("epoch") or 0):
        by_trial.setdefault(r["trial_id"], []).append(r)
    changed = [k for k in keys if any(len({fmt(r.get(k)) for r in rs}) > 1 for rs in by_trial.values())]
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
