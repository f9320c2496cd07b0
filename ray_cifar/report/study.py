"""What a report reads from one output folder (config.yaml, the Parquet files, trials.json, test.json), and
several outputs combined into one comparison."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import cut_short, flatten, load_yaml, yaml_problem
from ..results import (FINISHED, DamagedFile, is_train_output, read_results, read_rows, read_trials_state,
                       searched_columns)

STUDY_COLUMN = "study"  # the extra searched column of a comparison: which output a trial came from
ONE_RUN = "one run"  # Study.tune's scheduler for a train run's output
BUDGET_BY_STUDY = "budget_by_study"  # a comparison's config: each study's Study.budget
SCHEDULER_KEYS = ("scheduler", "search", "grace_period", "reduction_factor", "time_attr", "brackets", "max_epochs")


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
    def budget(self) -> str:
        """What its trials' length is counted in: "steps_run" where train.max_steps sets it (a large batch's trial
        that HyperBand ended at 2 epochs had 12 of its 90 steps, beside 90-step trials of 2 epochs), else
        "epochs". A comparison's trials each in their own study's (combine)."""
        return "steps_run" if (self.config.get("train") or {}).get("max_steps") else "epochs"

    def budget_of(self, trial: dict[str, Any]) -> tuple[str, Any]:
        """(unit, length) of one of its trials, in its own study's unit."""
        unit = (self.config.get(BUDGET_BY_STUDY) or {}).get(trial.get(STUDY_COLUMN), self.budget)
        return unit, trial.get(unit)

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
    table = bool(trials)
    so_far = [] if table else running_study_trials(output)
    trials = trials or so_far or train_run_trials(output, rows)
    one_run = is_train_output(output)
    # Without trials.parquet a study has not finished, whether trials.json is there (its statuses so far) or not (a
    # study starting, or a copy of its config and rows alone: reported as finished and tested, it was).
    return Study(name=name, config=config, rows=rows, trials=trials, unfinished=not table and not one_run,
                 one_run=one_run, last_phase_cut=table and not finished and not one_run)


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


def combine(studies: list[Study]) -> Study:
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
    config[BUDGET_BY_STUDY] = {s.name: s.budget for s in studies}  # (the first's train section spoke for all)
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


def lineage_studies(rows) -> set:
    """The studies whose trials PBT or PB2 made: their names in a comparison ({None}: the one study is)."""
    return {r.get(STUDY_COLUMN) for r in rows if r.get("pbt_generation") is not None}

