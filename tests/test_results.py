"""Results files: uneven rows, incremental parts with compaction, ranking by the study metric, replicates."""

from __future__ import annotations

import math
import os

import pyarrow.parquet as pq
import pytest

from ray_cifar.results import (ResultsLog, aggregate_over_seeds, best_epoch, rank_trials, read_results,
                               read_rows, summarize_trials, write_rows)


def test_write_rows_with_different_keys_fills_missing_with_null(tmp_path):
    # The best trial has test_loss, the others no checkpoint and so no such key; error only on a failed one.
    rows = [{"trial_id": "a", "best_val_acc": 0.9},
            {"trial_id": "b", "best_val_acc": 0.8, "test_loss": 0.4, "test_acc": 0.88},
            {"trial_id": "c", "error": None, "model.blocks": [1, 1]}]
    path = str(tmp_path / "trials.parquet")
    write_rows(rows, path)
    table = pq.read_table(path)
    assert table.column_names == ["trial_id", "best_val_acc", "test_loss", "test_acc", "error", "model.blocks"]
    back = table.to_pylist()
    assert back[0]["test_loss"] is None and back[1]["test_loss"] == 0.4
    assert back[2]["best_val_acc"] is None and back[2]["model.blocks"] == "[1, 1]"
    assert [r["error"] for r in back] == [None, None, None]  # an all-None column still writes


def test_write_rows_mixed_types_become_text_and_no_rows_write_an_empty_file(tmp_path):
    path = str(tmp_path / "x.parquet")
    write_rows([{"v": 3}, {"v": "auto"}], path)
    assert [r["v"] for r in read_rows(path)] == ["3", "auto"]
    write_rows([], path)
    assert read_rows(path) == []


def _epoch(trial, epoch, val_acc, **extra):
    return {"trial_id": trial, "epoch": epoch, "val_acc": val_acc, **extra}


def test_results_log_appends_parts_then_compacts_and_reads_everything(tmp_path):
    log = ResultsLog(str(tmp_path))
    log.append([_epoch("a", 1, 0.5)])
    first = log.append([_epoch("a", 2, 0.6), _epoch("b", 1, 0.4, lr=0.1)])
    assert os.path.basename(first) == "part-000001.parquet"
    assert not os.path.exists(log.path)  # an append rewrites nothing
    assert [(r["trial_id"], r["epoch"]) for r in read_results(str(tmp_path))] == [("a", 1), ("a", 2), ("b", 1)]

    path = log.compact()
    assert path == str(tmp_path / "results.parquet") and os.listdir(log.parts_dir) == []
    assert len(read_rows(path)) == 3

    # After compaction (e.g. a resumed study), new parts are read together with results.parquet,
    # and a repeated (trial_id, epoch) keeps the later row.
    again = ResultsLog(str(tmp_path))
    again.append([_epoch("a", 2, 0.65), _epoch("a", 3, 0.7)])
    rows = read_results(str(tmp_path))
    assert [(r["trial_id"], r["epoch"], r["val_acc"]) for r in rows] == [("a", 1, 0.5), ("b", 1, 0.4), ("a", 2, 0.65), ("a", 3, 0.7)]
    again.compact()
    assert len(read_rows(again.path)) == 4


def test_a_reader_sees_every_row_while_the_writer_compacts(tmp_path):
    """A study's driver merges its parts while it runs; a report or a second reader at the same time lists parts
    that are merged and gone before it opens them: it reads again, and never misses or doubles a row."""
    import threading

    log, done = ResultsLog(str(tmp_path)), threading.Event()

    def write():
        for epoch in range(1, 301):
            log.append([_epoch("a", epoch, epoch / 1000)])
            if epoch % 4 == 0:
                log.compact()
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen = 0
    while not done.is_set():
        epochs = [r["epoch"] for r in ResultsLog(str(tmp_path)).read()]
        assert sorted(epochs) == list(range(1, len(epochs) + 1)) and len(epochs) >= seen
        seen = len(epochs)
    writer.join()
    assert len(read_results(str(tmp_path))) == 300


def test_results_log_part_numbers_continue_after_a_restart(tmp_path):
    ResultsLog(str(tmp_path)).append([_epoch("a", 1, 0.5)])
    path = ResultsLog(str(tmp_path)).append([_epoch("a", 2, 0.6)])
    assert os.path.basename(path) == "part-000001.parquet"  # never overwrites part-000000


def test_results_log_append_cost_does_not_grow_with_rows(tmp_path):
    # Each append writes only its own rows: the part files stay the size of one batch.
    log = ResultsLog(str(tmp_path))
    for epoch in range(1, 31):
        log.append([_epoch("a", epoch, epoch / 100)])
    sizes = {pq.read_metadata(os.path.join(log.parts_dir, n)).num_rows for n in os.listdir(log.parts_dir)}
    assert sizes == {1}
    assert len(read_results(str(tmp_path))) == 30


def test_best_epoch_and_ranking_follow_metric_and_mode():
    rows = [{"trial_id": "a", "epoch": 1, "val_loss": 1.2, "val_acc": 0.6},
            {"trial_id": "a", "epoch": 2, "val_loss": 0.9, "val_acc": 0.55},
            {"trial_id": "a", "epoch": 3, "val_loss": float("nan"), "val_acc": 0.1}]
    assert best_epoch(rows, "val_loss", "min")["epoch"] == 2  # NaN (diverged) is never best
    assert best_epoch(rows, "val_acc", "max")["epoch"] == 1
    assert best_epoch([{"epoch": 1}], "val_loss", "min") is None

    trials = [{"trial_id": "hi_acc_hi_loss", "best_metric": 0.8},
              {"trial_id": "none", "best_metric": None},
              {"trial_id": "low_loss", "best_metric": 0.3}]
    assert [t["trial_id"] for t in rank_trials(trials, "val_loss", "min")] == ["low_loss", "hi_acc_hi_loss", "none"]
    assert [t["trial_id"] for t in rank_trials(trials, "val_acc", "max")] == ["hi_acc_hi_loss", "low_loss", "none"]
    # A tie is the earlier trial's, whichever reported first (was: the order given, trials.json's arrival order).
    tied = [{"trial_id": "x_00001", "best_metric": 0.3}, {"trial_id": "x_00000", "best_metric": 0.3}]
    assert [t["trial_id"] for t in rank_trials(tied, "val_acc", "max")] == ["x_00000", "x_00001"]
    with pytest.raises(ValueError, match="mode"):
        rank_trials(trials, "val_acc", "maximum")


def test_summarize_by_val_loss_min_picks_the_lowest_loss_trial_not_the_highest_accuracy():
    rows = [_epoch("accurate", 1, 0.80, val_loss=0.9), _epoch("accurate", 2, 0.82, val_loss=0.95),
            _epoch("calibrated", 1, 0.70, val_loss=0.6), _epoch("calibrated", 2, 0.75, val_loss=0.5),
            _epoch("diverged", 1, 0.10, val_loss=float("nan"))]
    ranked = summarize_trials(rows, "val_loss", "min")
    assert [t["trial_id"] for t in ranked] == ["calibrated", "accurate", "diverged"]
    best = ranked[0]
    assert (best["best_epoch"], best["best_metric"], best["val_acc"], best["epochs"]) == (2, 0.5, 0.75, 2)
    assert ranked[1]["best_epoch"] == 1 and ranked[2]["best_metric"] is None
    assert summarize_trials(rows, "val_acc", "max")[0]["trial_id"] == "accurate"


def test_a_diverged_epoch_scores_nothing_though_its_val_acc_is_a_number():
    """A diverged epoch's val_acc is a constant prediction's (~10%), not NaN: taken for a score, a trial whose
    first epoch diverged had that epoch as its best (its NaN weights were then evaluated on test), outranked a
    trial with no epoch yet, and replicates averaged it into a point's mean."""
    rows = [_epoch("steady", 1, 0.05), _epoch("blew_up", 1, 0.10, diverged=True, train_loss=float("nan")),
            _epoch("late", 1, 0.30), _epoch("late", 2, 0.12, diverged=True)]
    assert best_epoch([r for r in rows if r["trial_id"] == "blew_up"], "val_acc", "max") is None
    assert best_epoch([r for r in rows if r["trial_id"] == "late"], "val_acc", "max")["epoch"] == 1
    ranked = summarize_trials(rows, "val_acc", "max")
    assert [t["trial_id"] for t in ranked] == ["late", "steady", "blew_up"]
    blew_up = ranked[-1]
    assert (blew_up["best_metric"], blew_up["val_acc"], blew_up["epochs"], blew_up["diverged"]) == (None, None, 1, True)
    point = aggregate_over_seeds([{**t, "optim.lr": 1.0} for t in ranked if t["trial_id"] != "late"],
                                ["optim.lr"], "val_acc")
    assert point[0]["n"] == 1 and point[0]["values"] == [0.05]


def test_aggregate_over_seeds_groups_replicates_of_one_point():
    rows = [{"optim.lr": 0.1, "train.seed": s, "val_acc": v} for s, v in ((0, 0.90), (1, 0.92), (2, 0.94))]
    rows += [{"optim.lr": 0.01, "train.seed": 0, "val_acc": 0.80},
             {"optim.lr": 0.01, "train.seed": 1, "val_acc": None}]
    points = {p["optim.lr"]: p for p in aggregate_over_seeds(rows, ["optim.lr", "train.seed"], "val_acc")}
    assert set(points) == {0.1, 0.01}
    assert points[0.1]["n"] == 3 and math.isclose(points[0.1]["mean"], 0.92)
    assert math.isclose(points[0.1]["std"], 0.02)  # sample std of 0.90, 0.92, 0.94
    assert (points[0.01]["n"], points[0.01]["mean"], points[0.01]["std"]) == (1, 0.80, None)
    assert "train.seed" not in points[0.1]


# The noise of a ranking: checked against scipy.stats' own t interval and Welch test (a separate code
# path from ray_cifar's: scipy.stats.t.interval with the standard error, and ttest_ind(equal_var=False)).
SEED_ROWS = {
    "a": [0.912, 0.905, 0.921, 0.899, 0.915],
    "b": [0.903, 0.889, 0.911],
    "c": [0.870, 0.874, 0.869, 0.880],
    "d": [0.850],
}


def test_t_interval_and_welch_test_match_scipy_on_synthetic_seed_rows():
    import numpy as np
    from scipy import stats

    from ray_cifar.results import t_interval, welch_p_value

    for values in SEED_ROWS.values():
        if len(values) < 2:
            assert t_interval(values) is None
            continue
        low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert t_interval(values) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    for a, b in (("a", "b"), ("a", "c"), ("b", "c"), ("c", "a")):
        reference = stats.ttest_ind(SEED_ROWS[a], SEED_ROWS[b], equal_var=False).pvalue
        assert welch_p_value(SEED_ROWS[a], SEED_ROWS[b]) == pytest.approx(reference, rel=1e-9)
    assert welch_p_value(SEED_ROWS["a"], SEED_ROWS["c"]) < 0.001 < 0.05 < welch_p_value(SEED_ROWS["a"], SEED_ROWS["b"])
    assert welch_p_value(SEED_ROWS["a"], SEED_ROWS["d"]) is None  # one seed: no test
    assert welch_p_value([0.5, 0.5], [0.5, 0.5]) == 1.0 and welch_p_value([0.5, 0.5], [0.4, 0.4]) == 0.0


def test_aggregate_over_seeds_carries_the_interval():
    from scipy import stats

    rows = [{"optim.lr": lr, "train.seed": s, "val_acc": v} for lr, values in (("a", SEED_ROWS["a"]), ("d", SEED_ROWS["d"]))
            for s, v in enumerate(values)]
    points = {p["optim.lr"]: p for p in aggregate_over_seeds(rows, ["optim.lr", "train.seed"], "val_acc")}
    low, high = stats.t.interval(0.95, 4, loc=sum(SEED_ROWS["a"]) / 5, scale=stats.sem(SEED_ROWS["a"]))
    assert (points["a"]["ci_low"], points["a"]["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert points["a"]["values"] == SEED_ROWS["a"]
    assert (points["d"]["ci_low"], points["d"]["ci_high"], points["d"]["n"]) == (None, None, 1)


def test_the_final_table_prints_small_values_in_significant_digits():
    """A weight decay of 2.9e-05 (a PBT or log-uniform draw) printed "0.0000", and 5e-4 "0.0005" beside it; then an
    lr column printed 0.1000 beside 0.003. A column with a small value is in significant digits throughout."""
    from ray_cifar.results import format_table

    table = format_table([{"optim.weight_decay": 2.857e-05, "optim.lr": 0.1, "best_val_acc": 0.3375, "x": 0.0},
                          {"optim.weight_decay": 5e-4, "optim.lr": 0.00025, "best_val_acc": None, "x": 1.5}],
                         ["optim.weight_decay", "optim.lr", "best_val_acc", "x"])
    rows = [line.split() for line in table.splitlines()[2:]]
    assert rows == [["2.857e-05", "0.1", "0.3375", "0.0000"], ["0.0005", "0.00025", "-", "1.5000"]]
    # A searched field's large value too: an lr of 1000 read 1000.0000 beside 0.1000.
    table = format_table([{"optim.lr": 1000.0, "best_val_acc": 0.1}, {"optim.lr": 0.1, "best_val_acc": 0.32}],
                         ["optim.lr", "best_val_acc"])
    assert [line.split() for line in table.splitlines()[2:]] == [["1000", "0.1000"], ["0.1", "0.3200"]]
