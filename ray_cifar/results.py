"""Results are data: Parquet rows that reports, tables and plots are made from.

results.parquet  one row per trial per epoch: trial_id, epoch, each searched field as
                 its own column ("optim.name", ...), the epoch's metrics and timings.
trials.parquet   one row per trial: status (completed / stopped / diverged / failed / lost), epochs run,
                 best val_acc, and test_acc for the study's best trial (tune.test best) or every
                 finished trial (tune.test all).
Both carry the provenance columns of `provenance()`. Files are replaced atomically,
so a reader never sees half a file. During a study, epochs go to small part files under
results.parts/ (`ResultsLog`), merged into results.parquet every 256 parts and at the end; `read_results`
reads both.

Which trial and which epoch are best is decided here only (`best_epoch`, `rank_trials`,
`summarize_trials`), by the study's tune.metric and tune.mode; replicates of one searched
point (differing only in train.seed) are summarised by `aggregate_over_seeds` (mean, std, a t-based
95% interval), and two points compared by `welch_p_value`. `lineage_path` follows a PBT member's state back
through its donors: the schedule that trained it.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

EPOCH_METRICS = ("steps", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "eval_seconds",
                 "images_per_second", "num_workers", "train_images", "data_pipeline", "amp", "device", "nodes",
                 "diverged", "resumed_from_epoch", "startup_seconds", "checkpoint_path")
SCORE_COLUMNS = ("train_loss", "train_acc", "val_loss", "val_acc")  # an epoch's figures of how well it trained
LINEAGE_COLUMNS = ("pbt_generation", "pbt_parent")  # PBT studies only (ray_cifar.tuning.pbt): exploits so far, last donor
READ_RETRY_SECONDS = 60.0  # a read that keeps meeting merges of its parts gives up after this
TIMING_PREFIX = "timing_"  # timing_<phase>_seconds: where a trial's start-up went


def git_sha() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    import torch

    try:  # the installed version, without importing Ray (seconds) into a process that does not use it
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"git_sha": git_sha(), "torch_version": torch.__version__, "ray_version": ray_version,
            "python_version": platform.python_version(), "host_gpu": gpu}


FINISHED = "study-finished.json"  # a study's end marker (tuning.study.finish_study): time, failed trials, test figures
TRIALS_STATE = "trials.json"  # the study's per-trial summaries as it runs (tuning.recorder), trials.parquet's source


def read_trials_state(output: str) -> dict[str, dict[str, Any]] | None:
    """trials.json's summaries by trial id: {} where there is none, None where it will not read (damaged). The one
    reader of it: the recorder (which sets a damaged one aside), the schedulers, the finish and the report."""
    try:
        with open(os.path.join(output, TRIALS_STATE), "rb") as f:
            trials = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):  # ValueError: JSON and UTF-8 decoding errors
        return None
    return trials if isinstance(trials, dict) and all(isinstance(t, dict) for t in trials.values()) else None


def is_train_output(output: str) -> bool:
    """A `python -m ray_cifar.train` run's folder: its checkpoints/ beside config.yaml, which no study has (a study's
    are under ray/)."""
    return os.path.isdir(os.path.join(output, "checkpoints"))


def epoch_row(trial_id: str, params: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    row = {"trial_id": trial_id, "epoch": int(metrics["epoch"])}
    row.update(params)
    row.update({k: metrics.get(k) for k in EPOCH_METRICS})
    row.update({k: metrics[k] for k in LINEAGE_COLUMNS if k in metrics})
    # Start-up phases (trial.PhaseClock: a trial's first row) and the checkpoint save (every row).
    row.update({k: v for k, v in metrics.items() if k.startswith(TIMING_PREFIX)})
    row.update(extra)
    return row


def _column_safe(value: Any) -> Any:
    # Lists (e.g. model.blocks) and dicts go in as JSON text so every column has one type.
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)  # all None: a null column, which Parquet stores fine
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Mixed types (e.g. 3 and "auto"): text, rather than losing the rows.
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def rows_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows with different keys as one table: the union of the columns in first-seen order, missing values null."""
    rows = [{k: _column_safe(v) for k, v in r.items()} for r in rows]
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    # Not pa.Table.from_pylist: it takes its columns from the first row alone.
    return pa.table({c: _column([r.get(c) for r in rows]) for c in columns})


def write_rows(rows: Iterable[dict[str, Any]], path: str) -> None:
    """Write rows (keys may differ between rows) as Parquet, atomically: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(rows_table(rows), tmp)
    os.replace(tmp, path)


class DamagedFile(ValueError):
    """A results file that cannot be read (truncated, zero-length, overwritten); the message is one line."""


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a Parquet file; DamagedFile (one line naming it) when it cannot be read."""
    try:
        # One open file: by path, Parquet opens it twice (its footer, then its pages), and a file replaced whole in
        # between (a compaction while the study runs) read as damaged.
        with pa.OSFile(path) as f:
            return pq.read_table(f).to_pylist()
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DamagedFile(f"{path} is damaged and cannot be read ({reason})") from None


class ResultsLog:
    """results.parquet that grows by small part files, so recording an epoch costs the same at row 10 or 10,000.

    append() writes each batch of rows as DIR/results.parts/part-NNNNNN.parquet (atomically);
    compact() merges results.parquet and the parts into results.parquet and removes the parts it merged.
    read() sees both, so a study killed between compactions loses no reported epoch. A row is keyed by
    (trial_id, epoch): a later row for the same key replaces the earlier one (a resumed trial's epochs).
    One writer (the study driver) at a time.

    A damaged file (part or merged) makes read() raise DamagedFile, unless the log was opened with
    `set_aside_damaged`: then each one is renamed to NAME.damaged with a one-line warning and listed in
    `damaged`, so the study can go on and recover those rows from the trials' checkpoints.
    """

    PARTS = "results.parts"

    def __init__(self, output: str, name: str = "results.parquet", set_aside_damaged: bool = False, warn=print):
        self.path = os.path.join(output, name)
        self.parts_dir = os.path.join(output, self.PARTS)
        self.set_aside_damaged, self.warn, self.damaged = set_aside_damaged, warn, []
        self._next_part = 1 + max((_part_number(p) for p in self._parts()), default=-1)

    def _parts(self) -> list[str]:
        if not os.path.isdir(self.parts_dir):
            return []
        names = sorted(n for n in os.listdir(self.parts_dir) if _part_number(n) >= 0)
        return [os.path.join(self.parts_dir, n) for n in names]

    def append(self, rows: list[dict[str, Any]]) -> str | None:
        """Write these rows as the next part file; returns its path (None for no rows)."""
        if not rows:
            return None
        os.makedirs(self.parts_dir, exist_ok=True)
        path = os.path.join(self.parts_dir, f"part-{self._next_part:06d}.parquet")
        write_rows(rows, path)
        self._next_part += 1
        return path

    def read(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + READ_RETRY_SECONDS
        while True:
            try:
                return self._read(self._parts())
            except FileNotFoundError:
                # A part listed here was merged into results.parquet and removed (a study's driver compacts
                # while it runs): the merged file now has its rows, so read again. Not a count of tries: on a
                # loaded machine a slow read can meet several merges in a row.
                if time.monotonic() > deadline:
                    raise

    def part_count(self) -> int:
        """Parts not merged into results.parquet yet."""
        return len(self._parts())

    def _read(self, parts: list[str]) -> list[dict[str, Any]]:
        files = ([self.path] if os.path.exists(self.path) else []) + parts
        latest: dict[tuple[Any, Any], dict[str, Any]] = {}
        for f in files:
            for row in self._rows(f):
                latest.pop((row.get("trial_id"), row.get("epoch")), None)  # the later row, in its later place
                latest[(row.get("trial_id"), row.get("epoch"))] = row
        return list(latest.values())

    def _rows(self, path: str) -> list[dict[str, Any]]:
        try:
            return read_rows(path)
        except DamagedFile as e:
            if not self.set_aside_damaged:
                raise
            os.replace(path, path + ".damaged")  # out of the way of every later read and compaction
            self.damaged.append(path)
            self.warn(f"[ray_cifar] warning: {e}; set aside as {os.path.basename(path)}.damaged, "
                      f"its rows are recovered from the trials' checkpoints")
            return []

    def compact(self) -> str:
        """Merge the parts into results.parquet (written even with no rows); returns its path. A concurrent
        read() sees every row: the merged file replaces the old one whole before a part goes."""
        parts = self._parts()
        write_rows(self._read(parts), self.path)
        for p in parts:  # only after the merged file is in place: a crash here leaves duplicates, which read() drops
            os.remove(p)
        return self.path


def _part_number(name: str) -> int:
    base = os.path.basename(name)
    if not (base.startswith("part-") and base.endswith(".parquet")):
        return -1
    digits = base[len("part-"):-len(".parquet")]
    return int(digits) if digits.isdigit() else -1


def read_results(output: str) -> list[dict[str, Any]]:
    """Every epoch row of a study output: results.parquet plus any parts not yet compacted, deduplicated."""
    return ResultsLog(output).read()


# --- Ranking: the one place that says which trial and which epoch are best ---

SEED_KEY = "train.seed"


def metric_value(row: dict[str, Any], key: str) -> float | None:
    """row[key] as a float; None when missing, None or NaN (a NaN ranks last, never first)."""
    value = row.get(key)
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _order_key(value: float | None, mode: str) -> tuple[int, float]:
    if mode not in ("max", "min"):
        raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
    if value is None:
        return (1, 0.0)
    return (0, -value if mode == "max" else value)


def scored(row: dict[str, Any]) -> bool:
    """Whether an epoch's metrics score its trial: not a diverged epoch's. Its train loss was not finite, its
    weights may hold NaN, and its val_acc (a constant prediction's, ~10%) is a number all the same: taken for a
    score it was a trial's best epoch, its NaN weights were evaluated on test, and replicates averaged it."""
    return not row.get("diverged")


def best_epoch(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The epoch row of one trial with the best `metric` (earliest on ties); None if no row has a value (or
    every row with one diverged)."""
    scored_rows = [r for r in rows if scored(r) and metric_value(r, metric) is not None]
    if not scored_rows:
        return None
    return min(scored_rows, key=lambda r: (_order_key(metric_value(r, metric), mode), r.get("epoch") or 0))


def trial_value(trial: dict[str, Any], metric: str) -> float | None:
    """A trial summary's value of the study metric: best_metric (recorded by the study), else best_<metric>."""
    for key in ("best_metric", f"best_{metric}", metric):
        if trial.get(key) is not None:
            return metric_value(trial, key)
    return None


def rank_trials(trials: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Trials best first by `metric` and `mode`, ties (and trials without a value, last) in trial id order: the
    order the search made them. Before, a tie went to the trial that reported first (trials.json's order), so which
    of two trials at 0.3000 on 400 validation images was best, and had the test figure, was chance."""
    return sorted(trials, key=lambda t: (_order_key(trial_value(t, metric), mode), str(t.get("trial_id", ""))))


def summarize_trials(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """One summary per trial from its epoch rows, ranked: its searched columns, epochs, best_epoch,
    best_metric, and every epoch metric at that best epoch (so val_acc is the one at the metric's best)."""
    by_trial: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by_trial.setdefault(r.get("trial_id"), []).append(r)
    summaries = []
    for trial_id, trial_rows in by_trial.items():
        last = max(trial_rows, key=lambda r: r.get("epoch") or 0)
        best = best_epoch(trial_rows, metric, mode)
        # A trial without a scored epoch (its first diverged) has no figures at its best: none are taken from its last.
        summary = {**(best or {**last, **{k: None for k in SCORE_COLUMNS}}), "trial_id": trial_id,
                   "epochs": last.get("epoch"), "steps_run": last.get("steps")}  # (steps: at the best epoch)
        summary.update(best_epoch=best.get("epoch") if best else None,
                       best_metric=metric_value(best, metric) if best else None)
        summaries.append(summary)
    return rank_trials(summaries, metric, mode)


def lineage_path(rows: list[dict[str, Any]], trial_id: Any, epoch: int) -> list[dict[str, Any]]:
    """The PBT schedule that trained `trial_id`'s state at `epoch`, oldest first: one segment per generation on
    the way, each {"trial_id", "generation", "first_epoch", "last_epoch", "row" (its last row: the values in
    force)}, and where the segment began, "parent" and "parent_epoch" (the donor state it copied; None for a
    start from scratch), "missing" set where a row on the way is not in `rows` (the walk stops there). A
    member's generation trains on from the donor state it copied, so following pbt_parent back from the
    generation's first row (resumed_from_epoch: the donor's epoch) reaches generation 0 of some member."""
    by_trial: dict[Any, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r.get("epoch") is not None:
            by_trial.setdefault(r.get("trial_id"), {})[int(r["epoch"])] = r
    segments: list[dict[str, Any]] = []
    seen: set[tuple[Any, int]] = set()
    while (trial_id, epoch) not in seen:  # a cycle is impossible in a study's rows; damaged ones stop, not loop
        seen.add((trial_id, epoch))
        own = by_trial.get(trial_id, {})
        if epoch not in own:
            if segments:
                segments[0]["missing"] = True
            break
        generation = own[epoch].get("pbt_generation") or 0
        first = epoch
        while first - 1 in own and (own[first - 1].get("pbt_generation") or 0) == generation:
            first -= 1
        start = own[first]
        parent, parent_epoch = start.get("pbt_parent") or None, start.get("resumed_from_epoch")
        segment = {"trial_id": trial_id, "generation": generation, "first_epoch": first, "last_epoch": epoch,
                   "row": own[epoch], "parent": None, "parent_epoch": None}
        segments.insert(0, segment)
        if not generation:
            break  # trained from scratch: the path starts here
        if parent is None or parent_epoch is None or int(parent_epoch) + 1 != first:
            # The generation's first row is not here (it trains on from the donor's epoch: its first epoch is the
            # next one), so which state it copied is unknown.
            segment["missing"] = True
            break
        segment.update(parent=parent, parent_epoch=int(parent_epoch))
        trial_id, epoch = parent, int(parent_epoch)
    return segments


def searched_columns(rows: list[dict[str, Any]], with_seed: bool = False) -> list[str]:
    """The "section.field" columns of the rows (the searched fields), in first-seen order."""
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(k for k in r if "." in k))
    return [c for c in columns if with_seed or c != SEED_KEY]


# --- Noise: how sure a ranking is, from the train.seed replicates of each point ---

CONFIDENCE = 0.95


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean of `values` (mean +- t_{n-1} * s / sqrt(n), s the sample
    std); None for fewer than two values: one run has no interval."""
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t  # here: ~1 s to import, and a study of one seed a point never needs it
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * s / math.sqrt(n)
    return mean - half, mean + half


def welch_p_value(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) that `a` and `b` have the same mean; None when
    either has fewer than two values. Both without spread: 1.0 for equal means, else 0.0."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import t
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var_a = sum((v - mean_a) ** 2 for v in a) / (len(a) - 1) / len(a)  # squared standard errors
    var_b = sum((v - mean_b) ** 2 for v in b) / (len(b) - 1) / len(b)
    if var_a + var_b == 0:
        return 1.0 if mean_a == mean_b else 0.0
    stat = (mean_a - mean_b) / math.sqrt(var_a + var_b)
    # Welch-Satterthwaite degrees of freedom
    dof = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    return float(2 * t.sf(abs(stat), dof))


def aggregate_over_seeds(rows: list[dict[str, Any]], keys: list[str], value: str) -> list[dict[str, Any]]:
    """mean, std (sample, n-1; None for one value), n, the values, and the 95% t interval of the mean (ci_low,
    ci_high; None for one value) of `value` per point of `keys` (train.seed is never part of a point:
    replicates of a point differ only in it). Rows without a value are left out of n."""
    points: dict[tuple, list[float]] = {}
    first: dict[tuple, dict[str, Any]] = {}
    keys = [k for k in keys if k != SEED_KEY]
    for r in rows:
        point = tuple(_column_safe(r.get(k)) for k in keys)
        first.setdefault(point, {k: r.get(k) for k in keys})
        v = metric_value(r, value)
        points.setdefault(point, []).extend([] if v is None else [v])
    out = []
    for point, values in points.items():
        n = len(values)
        mean = sum(values) / n if n else None
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
        ci = t_interval(values)
        out.append({**first[point], "mean": mean, "std": std, "n": n, "values": values,
                    "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None})
    return out


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    # A searched field (section.field) prints in significant digits (an lr of 1000 read 1000.0000 beside 0.1000), and
    # so does every value of a column with a small one (a weight decay of 2.9e-05 printed "0.0000"); accuracies and
    # losses in 4 decimals.
    small = {c for c in columns if "." in c or any(isinstance(v, float) and v and abs(v) < 0.01
                                                   for v in (r.get(c) for r in rows))}

    def fmt(v: Any, column: str) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if column in small else f"{v:.4f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c), c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
