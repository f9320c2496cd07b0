"""A report page: every figure drawn and every table made (build), then written as report.md and report.html, with the
notes that say how to read them."""

from __future__ import annotations

import html
import os
import shlex
from dataclasses import dataclass
from typing import Any

from ..results import SEED_KEY, searched_columns
from .figures import (FIGURES, plot_asha, plot_curves, plot_heatmap, plot_params, plot_pbt, plot_published,
                      plot_ranking, plot_throughput)
from .schedulers import stops_text
from .study import STUDY_COLUMN, Study, combine, lineage_studies, load_study, study_max_epochs
from .tables import (BUDGET, NOISE_NOTE, UNITS, cell, fmt, html_table, markdown_table, match_published, point_label,
                     ran_fewer, replicate_rows, schedule_rows, summaries, val_noise_note)

TEST_ALL_NOTE = ("test_acc: every finished trial was evaluated once on the test split, at its best validation epoch "
                 "(tune.test all), after the study; no test figure chose any trial, epoch or point.")
TEST_BEST_NOTE = ("tune.test best: only the best trial has a test figure (evaluated once, after the study); tune.test "
                  "all puts one beside every finished trial.")
FEWER_EPOCHS_CAPTION = ("Each trial at its best epoch of those it ran: a trial stopped early (hollow; a cell's \"ep\" "
                        "says its trials' epochs, or its steps where train.max_steps sets the length) is at its best of "
                        "a smaller budget than the others, so a gap here is budget as much as values. The replicates "
                        "table compares only points of equal budgets.")
LAST_PHASE_CUT_NOTE = ("**Not finished**: the study was stopped in its last phase, the test evaluation (no "
                       "study-finished.json): every trial is here, but a test figure \"-\" may be one that never ran. "
                       "`python -m ray_cifar.tune --resume {location}` runs that phase again.")
NO_MATCH_CAPTION = ("No trial ran at the values of a published entry (config.yaml's `published`, each matched by all "
                    "of its `where`): a --smoke-test or --budget-scale run changes lengths, batch sizes and grids, so "
                    "its trials are not the published runs.")

LINEAGE_FIGURES = ("params", "heatmap")  # left out of a PBT or PB2 report: NO_POINTS_NOTE says why
NO_POINTS_WHY = ("PBT changes a member's values at each exploit, and the member trains on from its donor's state: "
                 "no trial ran at one point of the search space, and no two are independent replicates.")
NO_POINTS_NOTE = (f"{NO_POINTS_WHY} So this report has no replicates table, and no accuracy-against-field figures or "
                  "heatmaps. A trial's searched values are the ones in force at its best epoch. The schedule below, "
                  "and the last figure, show the values epoch by epoch.")


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
    units = set()
    for t in trials:  # its length in its own study's unit: epochs, or the steps of a train.max_steps study
        kind, t[BUDGET] = study.budget_of(t)
        units.add(UNITS[kind])
    unit = units.pop() if len(units) == 1 else "epochs or steps"
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
        plot_params(points, keys, p("params"), unit)
        plot_heatmap(points, keys, p("heatmap"), unit)
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
    if unit != "epochs":  # the table says the length that the study counts
        columns.insert(columns.index("epochs") + 1, "steps_run")
    columns = [c for c in dict.fromkeys(columns) if any(c in t for t in trials)]
    return {"trials": trials, "columns": columns, "keys": keys, "matches": matches, "lineage": sorted(pbt, key=str),
            "points": bool(points), "replicates": replicate_rows(points, keys, unit) if points else [],
            "best_pbt": best_pbt,
            "schedule": schedule_rows(study.rows, best_pbt, [k for k in keys if k != STUDY_COLUMN],  # in its ids
                                      study.metric) if best_pbt else [],
            "figures": figures,
            "captions": {"asha": f"What stopped trials early: {stops_text(study.tune, max_t)}.",
                         **({"params": FEWER_EPOCHS_CAPTION, "heatmap": FEWER_EPOCHS_CAPTION}
                            if any(ran_fewer(points)) else {}),
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
            f"({cell(best.get('best_metric'), 'best_metric')} at epoch {fmt(best.get('best_epoch'))}, "
            f"test_acc {cell(best.get('test_acc'), 'test_acc')}).")


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


def _last_phase_note(study: Study) -> str:
    return LAST_PHASE_CUT_NOTE.format(location=shlex.quote(study.location))


def trials_section(study: Study, built: dict[str, Any]) -> TableSection:
    note = _last_phase_note(study) if study.last_phase_cut else None if study.unfinished else (
        _test_note(study) or (TEST_BEST_NOTE if len(built["trials"]) > 1 else None))
    noise = val_noise_note(study, built["trials"])
    notes = [_headline(study, built)] + ([note] if note else []) + ([noise] if noise else [])
    if study.unfinished:
        running = sum(t.get("status") == "running" for t in study.trials)
        so_far = (f"{len(study.trials)} trial(s) so far, {running} of them unfinished; trials not started yet are not "
                  f"here" if study.trials else "nor a trials.json (a study starting, or a copy of its config and rows "
                  "alone): no trial's status is known here")
        notes.insert(0, f"**Not finished**: the study has no trials.parquet yet (running, or stopped before its end: "
                        f"`python -m ray_cifar.tune --resume {shlex.quote(study.location)}` goes on with it). "
                        f"{so_far}, and no trial has a test figure.")
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
            f"epoch {fmt(best.get('best_epoch'))}, {which}; each earlier generation on the way was trained by the "
            f"member whose state it copied.")
    why = NO_POINTS_NOTE if not built["points"] else (
        f"{NO_POINTS_WHY} So the replicates table and the accuracy-against-field figures and heatmaps leave out the "
        f"trials of {', '.join(map(str, built['lineage']))}; the last figure shows their values epoch by epoch.")
    return TableSection("The best trial's schedule", [lead, why], rows, list(rows[0]) if rows else [])


def published_section(study: Study, built: dict[str, Any]) -> TableSection | None:
    if not built["matches"]:
        return None
    notes = [_last_phase_note(study) if study.last_phase_cut else
             "Not finished (no trials.parquet): no trial has a test figure yet." if study.unfinished else
             (_test_note(study) or TEST_BEST_NOTE)]
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
    study = combine(studies)
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
