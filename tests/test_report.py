"""The study report: every figure from config.yaml + Parquet alone, a comparison of two outputs, clean errors."""

from __future__ import annotations

import importlib.util
import os

import pytest
import yaml
from PIL import Image

from conftest import resolved_config
from ray_cifar.report import FIGURES, load_study, main, summaries, write_report
from ray_cifar.report.tables import match_published
from ray_cifar.results import ResultsLog, write_rows

# Only the figure-making tests need matplotlib (a dependency in setup.py; install it into an older venv).
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_output(folder, lr_values=(0.1, 0.01), seeds=(0, 1), epochs=4, published=True) -> str:
    """A finished ASHA study as the study writes it: config.yaml, results (compacted + one part), trials."""
    os.makedirs(folder, exist_ok=True)
    config = {"train": {"epochs": epochs, "global_batch_size": 128},
              "optim": {"name": "sgd", "lr": 0.1},
              "model": {"name": "resnet", "blocks": [1, 1]},
              "tune": {"scheduler": "asha", "metric": "val_acc", "mode": "max", "grace_period": 1,
                       "reduction_factor": 2, "max_epochs": None,
                       "search_space": {"optim.lr": {"grid": list(lr_values)}}}}
    if published:
        config["published"] = [{"where": {"optim.lr": 0.1}, "value": 70.0, "metric": "val_acc", "source": "paper A"},
                               {"where": {"optim.lr": 0.1}, "value": 69.0, "metric": "test_acc", "source": "paper A"},
                               {"where": {"optim.lr": 0.01, "model.blocks": [1, 1]}, "value": 60.0,
                                "metric": "test_acc", "source": "paper A, table 2"}]
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(resolved_config(config), f)
    rows, trials = [], []
    for i, (lr, seed) in enumerate((lr, s) for lr in lr_values for s in seeds):
        trial_id = f"t{i}"
        run = epochs if lr == lr_values[0] else 1  # ASHA stops the worse lr at the first rung
        for epoch in range(1, run + 1):
            acc = (0.5 if lr == lr_values[0] else 0.3) + 0.05 * epoch + 0.01 * seed
            rows.append({"trial_id": trial_id, "epoch": epoch, "optim.lr": lr, "train.seed": seed,
                         "train_loss": 2.0 / epoch, "val_acc": acc, "val_loss": 1.5 - acc,
                         "images_per_second": 1000.0 + 100 * i})
        trials.append({"trial_id": trial_id, "optim.lr": lr, "train.seed": seed, "epochs": run,
                       "status": "completed" if run == epochs else "stopped"})
    trials[1]["test_acc"] = 0.71  # the best trial (lr 0.1, seed 1)
    log = ResultsLog(folder)
    log.append(rows[:-2])
    log.compact()
    log.append(rows[-2:])  # not compacted yet: a study killed here still reports these
    write_rows(trials, os.path.join(folder, "trials.parquet"))
    with open(os.path.join(folder, "study-finished.json"), "w") as f:  # written last, as finish_study does
        f.write("{}")
    return folder


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()


@needs_matplotlib
def test_report_has_every_figure_and_the_html_references_each(tmp_path):
    out = make_output(str(tmp_path / "study"))
    html_path = write_report([out])
    assert html_path == os.path.join(out, "report.html")
    page = open(html_path).read()
    md = open(os.path.join(out, "report.md")).read()
    for name in FIGURES:
        rel = f"figures/{name}.png"
        assert_png(os.path.join(out, rel))
        assert f'src="{rel}"' in page and f"({rel})" in md
    assert "paper A, table 2" in page  # the published table
    assert "± " in md  # replicates shown as mean ± std


def test_ranking_uses_all_rows_and_marks_the_test_evaluated_trial(tmp_path):
    study = load_study(make_output(str(tmp_path / "study")))
    ranked = summaries(study)
    assert ranked[0]["trial_id"] == "t1" and ranked[0]["test_acc"] == 0.71
    assert ranked[0]["best_epoch"] == 4 and len(study.rows) == 10  # the uncompacted part is read too


def test_published_entries_match_trials_by_where(tmp_path):
    study = load_study(make_output(str(tmp_path / "study")))
    trials = summaries(study)
    for t in trials:
        t["label"] = t["trial_id"]
    matches = {m["trial_id"]: m for m in match_published(study, trials)}
    assert set(matches) == {"t0", "t1", "t2", "t3"}
    all_matches = match_published(study, trials)
    t1 = [(m["published %"], m["metric"], m["ours %"]) for m in all_matches if m["trial_id"] == "t1"]
    # a run's val and test figures side by side: val_acc at the best epoch, and the test-evaluated trial's test_acc
    assert t1 == [(70.0, "val_acc", pytest.approx(71.0)), (69.0, "test_acc", pytest.approx(71.0))]
    # the lr 0.01 entry is more specific (two where items) and asks for test_acc, which only the best trial has
    assert matches["t2"]["published %"] == 60.0 and matches["t2"]["ours %"] is None


@needs_matplotlib
def test_comparison_of_two_outputs(tmp_path):
    a = make_output(str(tmp_path / "sgd"))
    b = make_output(str(tmp_path / "adam"), lr_values=(0.001, 0.0001), published=False)
    assert main([a, b, "--out", str(tmp_path / "cmp")]) == 0
    page = open(tmp_path / "cmp" / "compare-report.html").read()
    for name in FIGURES:
        assert_png(tmp_path / "cmp" / "compare-figures" / f"{name}.png")
        assert f'src="compare-figures/{name}.png"' in page
    assert "sgd/t1" in page and "adam/t0" in page
    # default folder: the first output
    assert main([a, b]) == 0 and os.path.exists(os.path.join(a, "compare-report.html"))


@needs_matplotlib
def test_the_report_says_what_stopped_trials_early_bohb_and_each_compared_study_included(tmp_path):
    """BOHB's HyperBand stopped trials while tune.scheduler said fifo: the report said "fifo: no rungs" and never
    named BOHB. A comparison drew every study's stops under the first study's scheduler."""
    asha = make_output(str(tmp_path / "asha"))
    assert main([asha]) == 0
    assert ("What stopped trials early: asha: grace 1, reduction 2, rungs at 1, 2, max 4."
            in open(tmp_path / "asha" / "report.md").read())
    bohb = make_output(str(tmp_path / "bohb"), published=False)
    config = yaml.safe_load(open(tmp_path / "bohb" / "config.yaml"))
    config["tune"].update(scheduler="fifo", search="bohb")
    yaml.safe_dump(config, open(tmp_path / "bohb" / "config.yaml", "w"))
    assert main([bohb]) == 0
    hyperband = ("BOHB's HyperBand, reduction 2, max 4: brackets filled in turn, the best 1/2 going on at each "
                 "milestone (4 places, judged at epochs 1, 2, the last at 4; 3 places, judged at epoch 2, the last at "
                 "4; 3 places, run to 4; drawn: the first's)")
    assert f"What stopped trials early: {hyperband}." in open(tmp_path / "bohb" / "report.md").read()
    assert main([asha, bohb, "--out", str(tmp_path / "cmp")]) == 0
    assert (f"What stopped trials early: asha: asha: grace 1, reduction 2, rungs at 1, 2, max 4; bohb: {hyperband}."
            in open(tmp_path / "cmp" / "compare-report.md").read())


@needs_matplotlib
def test_a_train_runs_report_shows_its_test_figure(tmp_path):
    """`python -m ray_cifar.train` keeps its test figures in test.json (no trials.parquet): its report said "-"."""
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "checkpoints"))  # a train run's folder
    with open(os.path.join(run, "config.yaml"), "w") as f:  # its tune section at the defaults: ASHA's among them
        yaml.safe_dump(resolved_config({"train": {"epochs": 4}, "tune": {
            "metric": "val_acc", "mode": "max", "scheduler": "asha", "grace_period": 1, "reduction_factor": 2}}), f)
    ResultsLog(run).append([{"trial_id": "t0", "epoch": e, "train_loss": 1.0 / e, "val_acc": 0.5 + 0.05 * e,
                             "val_loss": 1.0, "images_per_second": 1000.0} for e in range(1, 5)])
    with open(os.path.join(run, "test.json"), "w") as f:
        f.write('{"best_epoch": 4, "test_loss": 1.2, "test_acc": 0.4242}')
    assert main([run]) == 0
    md = open(os.path.join(run, "report.md")).read()
    assert "best trial `t0` (0.7000 at epoch 4, test_acc 0.4242)" in md  # (4 decimals, as the console prints it)
    # No scheduler ran: its report said "What stopped trials early: asha: ... rungs at 1, 2" and drew them, its
    # one trial with "no status yet".
    assert "asha" not in md and "figures/asha.png" not in md and "| completed |" in md
    # One run of nothing searched: no field to draw accuracy against, no heatmap, no replicates.
    assert "figures/params.png" not in md and "figures/heatmap.png" not in md and "## Replicates" not in md
    assert load_study(run).tune["scheduler"] == "one run"


def test_a_comparison_shows_a_field_one_study_fixed_and_another_searched_by_its_value(tmp_path):
    """Compared with a study that searched the batch size, the one that fixed it at 128 showed "-" (read as unknown)."""
    from ray_cifar.report import combine

    a = make_output(str(tmp_path / "lr"))  # searches optim.lr; train.global_batch_size fixed at 128
    b = str(tmp_path / "batch")
    os.makedirs(b)
    with open(os.path.join(b, "config.yaml"), "w") as f:
        yaml.safe_dump(resolved_config({"train": {"epochs": 2, "global_batch_size": 256},
                                        "optim": {"name": "sgd", "lr": 0.05}, "tune": {"metric": "val_acc", "mode": "max"}}), f)
    ResultsLog(b).append([{"trial_id": f"b{n}", "epoch": 1, "train.global_batch_size": batch, "val_acc": 0.5,
                           "train_loss": 1.0} for n, batch in enumerate((256, 512))])
    combined = combine([load_study(a), load_study(b)])
    values = {(r["trial_id"], r["epoch"]): (r.get("optim.lr"), r.get("train.global_batch_size")) for r in combined.rows}
    assert values[("lr/t0", 1)] == (0.1, 128) and values[("batch/b1", 1)] == (0.05, 512), values
    assert {t["trial_id"]: t.get("train.global_batch_size") for t in combined.trials}["lr/t0"] == 128
    assert main([a, b, "--out", str(tmp_path / "cmp")]) == 0


def test_asha_rungs_and_max_epochs_come_from_the_config():
    from ray_cifar.report import Study, study_max_epochs
    from ray_cifar.report.schedulers import asha_rungs

    assert asha_rungs({"scheduler": "asha", "grace_period": 1, "reduction_factor": 2}, 6) == [1, 2, 4]
    assert asha_rungs({"scheduler": "asha", "grace_period": 5, "reduction_factor": 3}, 50) == [5, 15, 45]
    assert asha_rungs({"scheduler": "fifo", "grace_period": 1, "reduction_factor": 2}, 6) == []
    # rungs in optimizer steps have no place on an epoch axis
    assert asha_rungs({"scheduler": "asha", "grace_period": 50, "reduction_factor": 2, "time_attr": "steps"}, 6) == []
    trials = [{"epochs": 7}]
    assert study_max_epochs(Study("s", {"train": {"epochs": 6}, "tune": {}}, []), trials) == 6
    assert study_max_epochs(Study("s", {"train": {"epochs": 6}, "tune": {"max_epochs": 4}}, []), trials) == 4
    # with train.max_steps the epochs follow from the batch size: the longest planned or run trial
    steps = Study("s", {"train": {"epochs": 6, "max_steps": 300}, "tune": {}}, [], trials=[{"planned_epochs": 9}])
    assert study_max_epochs(steps, trials) == 9


def test_not_a_study_output_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a study output" in err and str(tmp_path) in err


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "python -m ray_cifar.report out/smoke" in capsys.readouterr().out


STUDIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies")


@pytest.mark.parametrize("name", ["resnet18_lr_schedule_wd", "resnet18_erasing_sweep", "resnet_under_5m",
                                  "adam_batch_lr_grid", "optimizer_batch_decay"])
def test_each_published_figure_of_a_shipped_study_lands_on_its_run(name):
    import itertools

    from ray_cifar.config import Config, apply_overrides, flatten, search_keys
    from ray_cifar.validation import trial_config
    from ray_cifar.report import Study

    from ray_cifar.validation import load_config

    cfg = load_config(os.path.join(STUDIES, f"{name}.yaml"))  # as the study reads it: each entry's run pinned
    published = cfg.published
    base = cfg.to_dict()
    base.pop("published")
    space, base["tune"]["search_space"] = base["tune"]["search_space"], {}
    keys = search_keys(space)
    trials = []
    for i, combo in enumerate(itertools.product(*[[(k, v) for v in spec["grid"]] for k, spec in space.items()])):
        flat = flatten(trial_config(base, dict(combo)).to_dict())
        trials.append({"trial_id": i, "label": str(i), **{k: flat[k] for k in keys}, "val_acc": 0.5})
    matches = match_published(Study(name=name, config={**base, "published": published}, rows=[]), trials)
    # Every entry lands on exactly one run; the variant studies list theirs in the order of the variants.
    assert sorted(m["published %"] for m in matches) == sorted(float(p["value"]) for p in published)
    # The same study shrunk (--smoke-test) or shortened (--budget-scale) is not the published run: no entry lands.
    for shrunk in (load_config(os.path.join(STUDIES, f"{name}.yaml"), smoke_test=True),
                   load_config(os.path.join(STUDIES, f"{name}.yaml"), budget_scale=0.2)):
        small = shrunk.to_dict()
        space, small["tune"]["search_space"] = small["tune"]["search_space"], {}
        points = [flatten(trial_config(small, dict(combo)).to_dict()) for combo in itertools.product(
            *[[(k, v) for v in spec["grid"]] for k, spec in space.items()])]
        assert match_published(Study(name=name, config=small, rows=[]),
                               [{"trial_id": i, "label": str(i), **p, "val_acc": 0.5} for i, p in enumerate(points)]) == []
    if "variants" in space:
        assert len({m["trial_id"] for m in matches}) == len(trials)
        assert [m["trial_id"] for m in matches] == sorted(m["trial_id"] for m in matches)
    assert {p["metric"] for p in published} <= {"val_acc", "test_acc"} and all(p.get("source") for p in published)


def test_replicate_table_has_intervals_and_a_welch_column_checked_against_scipy():
    from scipy import stats

    from ray_cifar.report.tables import NOISE_NOTE, VERSUS_BEST, replicate_rows

    # Synthetic trial summaries: four points, one of them with a single seed.
    points = {0.1: [0.912, 0.905, 0.921, 0.899, 0.915], 0.2: [0.903, 0.889, 0.911], 0.05: [0.870, 0.874, 0.869, 0.880],
              0.3: [0.850]}
    trials = [{"optim.lr": lr, "train.seed": s, "val_acc": v} for lr, vs in points.items() for s, v in enumerate(vs)]
    rows = {r["optim.lr"]: r for r in replicate_rows(trials, ["optim.lr"])}
    assert list(rows) == [0.1, 0.2, 0.05, 0.3]  # best mean first
    low, high = stats.t.interval(0.95, 4, loc=sum(points[0.1]) / 5, scale=stats.sem(points[0.1]))
    assert rows[0.1]["95% CI (t)"] == f"[{100 * low:.2f}, {100 * high:.2f}]"
    assert rows[0.1][VERSUS_BEST] == "best"
    p_close = stats.ttest_ind(points[0.2], points[0.1], equal_var=False).pvalue
    p_far = stats.ttest_ind(points[0.05], points[0.1], equal_var=False).pvalue
    assert p_close > 0.05 > p_far
    assert rows[0.2][VERSUS_BEST] == f"within noise (p={p_close:.2g})"
    assert rows[0.05][VERSUS_BEST] == f"worse (p={p_far:.3g})"
    assert rows[0.3]["95% CI (t)"] == "n=1: no interval" and rows[0.3][VERSUS_BEST] == "n=1: no test"
    assert rows[0.3]["n"] == 1 and "Welch" in NOISE_NOTE and "Student-t" in NOISE_NOTE


def test_a_point_asha_stopped_early_is_not_compared_with_the_best_by_welch():
    """ASHA stops some seeds of a point at a rung: their val_acc is a shorter run's. The table put them through
    Welch's test against the best's full runs ("worse (p=...)"), a gap of budget read as a gap of values."""
    from ray_cifar.report.tables import VERSUS_BEST, replicate_rows

    def seeds(lr, epochs_accs):
        return [{"optim.lr": lr, "train.seed": s, "epochs": e, "val_acc": a} for s, (e, a) in enumerate(epochs_accs)]

    trials = (seeds(0.1, [(8, 0.91), (8, 0.90), (8, 0.92)]) + seeds(0.2, [(8, 0.85), (8, 0.86), (8, 0.84)])
              + seeds(0.3, [(8, 0.89), (2, 0.50), (2, 0.52)]) + seeds(0.4, [(2, 0.40), (2, 0.41), (2, 0.42)])
              + seeds(0.10001, [(2, 0.70), (2, 0.71), (2, 0.69)]))
    rows = {r["optim.lr"]: r for r in replicate_rows(trials, ["optim.lr"])}
    assert rows[0.2][VERSUS_BEST].startswith("worse (p=") and rows[0.2]["epochs"] == "8"
    assert rows[0.3][VERSUS_BEST] == "not compared: epochs 2, 8 against the best's 8" and rows[0.3]["epochs"] == "2, 8"
    assert rows[0.4][VERSUS_BEST] == "not compared: epochs 2 against the best's 8"
    # Two values that print alike (0.1) are two points, each with its own seeds and epochs.
    assert rows[0.10001]["epochs"] == "2" and rows[0.1]["epochs"] == "8" and rows[0.10001]["n"] == 3


def test_heatmap_pairs_skip_relabelled_fields_and_pairs_without_a_cross():
    from ray_cifar.report.figures import heatmap_pairs

    # optim bundles (name, lr, weight_decay) x batch: weight_decay relabels name; each lr has one optimizer
    bundles = [("sgd", 0.05, 5e-4), ("sgd", 0.2, 5e-4), ("adam", 0.001, 0.0), ("adam", 0.01, 0.0)]
    trials = [{"optim.name": n, "optim.lr": lr, "optim.weight_decay": wd, "train.global_batch_size": b}
              for n, lr, wd in bundles for b in (64, 256)]
    keys = ["optim.name", "optim.lr", "optim.weight_decay", "train.global_batch_size"]
    assert heatmap_pairs(trials, keys) == [("optim.lr", "train.global_batch_size"),
                                           ("optim.name", "train.global_batch_size")]
    assert heatmap_pairs(trials, ["optim.lr"]) == []


def test_a_report_of_one_seed_a_point_does_not_import_scipy(tmp_path):
    """SciPy (~1 s to import at the end of every study) only for intervals and tests, which need two seeds."""
    import subprocess
    import sys

    output = make_output(tmp_path / "one_seed", seeds=(0,))
    code = ("import sys; from ray_cifar.report import write_report; write_report([sys.argv[1]]); "
            "assert 'scipy.stats' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code, output], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.exists(os.path.join(output, "report.html"))


def pbt_rows() -> list[dict]:
    """Three PBT members as the study records them. t1 trains 6 epochs from scratch; t2 copies t1's epoch-2 state
    (generation 1, its epochs 3-6); t0 copies t2's epoch-4 state (generation 1, its epochs 5-6) and is the best."""
    rows = []

    def member(tid, epochs, generation, parent, resumed, lr, acc0):
        rows.extend({"trial_id": tid, "epoch": e, "optim.lr": lr, "train.seed": 7, "pbt_generation": generation,
                     "pbt_parent": parent, "resumed_from_epoch": resumed, "val_acc": acc0 + 0.01 * e,
                     "train_loss": 1.0, "images_per_second": 1000.0} for e in epochs)

    member("t1", range(1, 7), 0, "", 0, 0.1, 0.30)
    member("t2", range(1, 3), 0, "", 0, 0.05, 0.20)
    member("t2", range(3, 7), 1, "t1", 2, 0.12, 0.35)
    member("t0", range(1, 5), 0, "", 0, 0.01, 0.10)
    member("t0", range(5, 7), 1, "t2", 4, 0.144, 0.50)
    return rows


def test_the_best_pbt_trials_schedule_follows_its_donors_back_to_scratch():
    from ray_cifar.results import lineage_path

    path = lineage_path(pbt_rows(), "t0", 6)
    assert [(s["trial_id"], s["generation"], s["first_epoch"], s["last_epoch"], s["parent"], s["parent_epoch"],
             s["row"]["optim.lr"]) for s in path] == [("t1", 0, 1, 2, None, None, 0.1),
                                                     ("t2", 1, 3, 4, "t1", 2, 0.12),
                                                     ("t0", 1, 5, 6, "t2", 4, 0.144)]
    assert [s["trial_id"] for s in lineage_path(pbt_rows(), "t0", 3)] == ["t0"]  # its own generation 0
    # A row on the way lost (t2's epoch 3, its generation's first): which state it copied is unknown, said so.
    lost = [r for r in pbt_rows() if (r["trial_id"], r["epoch"]) != ("t2", 3)]
    path = lineage_path(lost, "t0", 6)
    assert [(s["trial_id"], s["first_epoch"], s.get("missing", False)) for s in path] == [("t2", 4, True),
                                                                                          ("t0", 5, False)]
    # A donor's row missing: the walk stops at the member that copied it.
    gone = [r for r in pbt_rows() if (r["trial_id"], r["epoch"]) != ("t2", 4)]
    assert [(s["trial_id"], s.get("missing", False)) for s in lineage_path(gone, "t0", 6)] == [("t0", True)]


def write_pbt_output(folder) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(resolved_config({"train": {"epochs": 6}, "tune": {
            "scheduler": "pbt", "metric": "val_acc", "mode": "max",
            "search_space": {"optim.lr": {"loguniform": [0.001, 1.0]}}}}), f)
    ResultsLog(folder).append(pbt_rows())
    return folder


@needs_matplotlib
def test_a_pbt_report_shows_the_best_schedule_and_no_points_of_the_search_space(tmp_path):
    """A PBT member's values change at each exploit and its weights come from its donors: the report grouped members
    by the values at their best epochs into "points" with replicates and Welch tests, and drew accuracy against
    those values, as if each member had trained at them. It showed the schedule PBT found only as a figure."""
    out = write_pbt_output(str(tmp_path / "pbt"))
    assert main([out]) == 0
    md = open(os.path.join(out, "report.md")).read()
    assert "## The best trial's schedule" in md
    assert ("| 1-2 | t1 (generation 0) | 0.1 | 0.32 | scratch (its own initial values) |\n"
            "| 3-4 | t2 (generation 1) | 0.12 | 0.39 | trial t1's state at epoch 2 |\n"
            "| 5-6 | t0 (generation 1) | 0.144 | 0.56 | trial t2's state at epoch 4 |") in md
    assert "Replicates" not in md and "figures/params.png" not in md and "figures/heatmap.png" not in md
    assert "figures/pbt.png" in md
    # Compared with itself: donors are named as the trial ids are ("pbt/t2"), so each arrow and path finds them.
    from ray_cifar.report import build, combine

    combined = combine([load_study(out), load_study(write_pbt_output(str(tmp_path / "pbt_copy")))])  # (ties: pbt/ first)
    built = build(combined, str(tmp_path / "cmp"))
    assert [r["trained by"] for r in built["schedule"]] == ["pbt/t1 (generation 0)", "pbt/t2 (generation 1)",
                                                            "pbt/t0 (generation 1)"]


@needs_matplotlib
def test_a_comparison_draws_each_studys_rungs_at_its_own_length(tmp_path, monkeypatch):
    """Two ASHA studies alike but in length: the 4-epoch one read "rungs at 1, 2, 4, max 6", the 6-epoch one's."""
    short = make_output(str(tmp_path / "short"), epochs=4, published=False)
    long = make_output(str(tmp_path / "long"), epochs=6, published=False)
    assert main([long, short, "--out", str(tmp_path / "cmp")]) == 0
    assert ("long: asha: grace 1, reduction 2, rungs at 1, 2, 4, max 6; short: asha: grace 1, reduction 2, rungs at "
            "1, 2, max 4.") in open(tmp_path / "cmp" / "compare-report.md").read()
    # The figure draws them so too, on each trial's bar (it drew no rungs, and one max at 6 for both).
    from ray_cifar.report import build, combine, figures

    study = combine([load_study(long), load_study(short)])
    built = build(study, str(tmp_path / "again"))
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig) or path)
    figures.plot_asha(built["trials"], study.tune, 6, str(tmp_path / "a.png"))
    marks = {}  # bar -> the x of its marks (dashed: rungs, solid: max)
    for line in saved[0].axes[0].lines:
        marks.setdefault(round(float(sum(line.get_ydata())) / 2), []).append((line.get_xdata()[0], line.get_linestyle()))
    for i, t in enumerate(built["trials"]):
        rungs, top = ([1, 2, 4], 6) if t["study"] == "long" else ([1, 2], 4)
        assert sorted(marks[i]) == sorted([(r, "--") for r in rungs] + [(top, "-")]), t["trial_id"]
    # A study whose trials searched a longer train.epochs than its own: the longest planned trial is ASHA's top.
    from ray_cifar.report import study_max_epochs

    study = load_study(short)
    study.trials[0]["planned_epochs"] = 8
    assert study_max_epochs(study, study.trials) == 8


@needs_matplotlib
def test_a_study_with_nothing_published_has_no_published_figure(tmp_path):
    """Its "Beside the published figures" section held only an image saying no entry matched."""
    out = make_output(str(tmp_path / "none"), published=False)
    assert main([out]) == 0
    md = open(tmp_path / "none" / "report.md").read()
    assert "Beside the published figures" not in md and not (tmp_path / "none" / "figures" / "published.png").exists()
    assert "figures/ranking.png" in md
    # Entries that no trial matches (a smoke run's grid, here other lrs): the figure, and a line that says why.
    out = make_output(str(tmp_path / "other"), lr_values=(0.2, 0.02))
    assert main([out]) == 0
    md = open(tmp_path / "other" / "report.md").read()
    assert "## Beside the published figures\n\nNo trial ran at the values of a published entry" in md


@needs_matplotlib
def test_a_comparison_says_which_studies_evaluated_every_trial_on_test(tmp_path):
    """The first study's tune.test spoke for all: "every finished trial was evaluated" beside a tune.test best study
    whose trials but one show "-", and nothing where only the second study evaluated every trial."""
    every = make_output(str(tmp_path / "every"), published=False)
    config = yaml.safe_load(open(tmp_path / "every" / "config.yaml"))
    config["tune"]["test"] = "all"
    yaml.safe_dump(config, open(tmp_path / "every" / "config.yaml", "w"))
    best = make_output(str(tmp_path / "best"), published=False)
    for order, out in (([every, best], "a"), ([best, every], "b")):
        assert main([*order, "--out", str(tmp_path / out)]) == 0
        md = open(tmp_path / out / "compare-report.md").read()
        assert ("test_acc: every finished trial of every was evaluated once on the test split, at its best validation "
                "epoch (tune.test all); of best, the best trial only (tune.test best).") in md, md[:2000]
        assert "every finished trial was evaluated" not in md
    assert main([every, every, "--out", str(tmp_path / "c")]) == 0  # (both all: the one study's note)
    assert "test_acc: every finished trial was evaluated once" in open(tmp_path / "c" / "compare-report.md").read()
    assert main([best]) == 0  # a tune.test best study says why its other trials show "-"
    assert "tune.test best: only the best trial has a test figure" in open(tmp_path / "best" / "report.md").read()


@needs_matplotlib
def test_a_comparison_of_a_grid_and_a_pbt_study_keeps_the_grids_points(tmp_path):
    """The PBT study's trials are no points of the search space; the grid's are. A comparison of the two dropped the
    replicates table and the accuracy-against-field figures of both."""
    grid = make_output(str(tmp_path / "grid"), published=False)
    pbt = write_pbt_output(str(tmp_path / "pbt"))
    assert main([grid, pbt, "--out", str(tmp_path / "cmp")]) == 0
    md = open(tmp_path / "cmp" / "compare-report.md").read()
    replicates = md.split("## Replicates", 1)[1].split("\n## ", 1)[0]
    assert "grid" in replicates and "pbt" not in replicates.replace("The trials of pbt are not here", "")
    assert "The trials of pbt are not here: PBT made them" in replicates
    assert "compare-figures/params.png" in md and "compare-figures/pbt.png" in md
    schedule = md.split("## The best trial's schedule", 1)[1].split("\n## ", 1)[0]
    assert "trained trial pbt/t0's epoch 6, the best that PBT made" in schedule  # the grid's best is higher
    assert "leave out the trials of pbt" in schedule and "this report has no replicates table" not in schedule
    assert "| 5-6 | pbt/t0 (generation 1) | 0.144 |" in schedule


def test_a_report_module_that_fails_to_import_does_not_fail_the_study(tmp_path, monkeypatch, capsys):
    """The end of a study draws its report under a guard ("a report that cannot be drawn never fails the study"),
    but imported the report module outside it: a module that did not import ended the finish with a traceback."""
    import sys

    from ray_cifar.tuning.study import write_study_report

    monkeypatch.setitem(sys.modules, "ray_cifar.report", None)  # its import raises ModuleNotFoundError
    write_study_report(str(tmp_path))
    out = capsys.readouterr().out
    assert "report not written (ModuleNotFoundError" in out and f"python -m ray_cifar.report {tmp_path}" in out


@needs_matplotlib
def test_the_pbt_figure_and_the_curves_draw_a_members_generations_apart(tmp_path, monkeypatch):
    """After an exploit a member trains on from its donor's state: a line joining its last epoch before to its first
    after read as its own progress. One line a generation; the arrow from the donor shows where it went on from."""
    from ray_cifar.report import figures

    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault("fig", fig) and path)
    figures.plot_pbt(pbt_rows(), ["optim.lr"], "val_acc", str(tmp_path / "pbt.png"))
    lr_axis, metric_axis = drawn["fig"].axes[:2]
    for ax in (lr_axis, metric_axis):
        assert len(ax.lines) == 5  # t1: one generation; t2 and t0: two each
        assert len({line.get_color() for line in ax.lines}) == 3  # a colour a member
    pieces = [(1, 2), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6), (3, 4, 5, 6), (5, 6)]
    assert sorted(tuple(line.get_xdata()) for line in metric_axis.lines) == pieces
    # The learning curves too.
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    trials = [{"trial_id": t, "point": t} for t in ("t0", "t1", "t2")]
    figures.plot_curves(pbt_rows(), trials, str(tmp_path / "curves.png"))
    assert sorted(tuple(line.get_xdata()) for line in saved[0].axes[0].lines) == pieces


def test_a_report_of_a_study_not_finished_shows_each_trials_status_so_far_and_says_so(tmp_path, capsys):
    """Killed (or running) studies have no trials.parquet: the report had no status column and no word that trials
    were missing, though trials.json holds each trial's status. An empty config.yaml ranked by the defaults."""
    import json

    out = make_output(str(tmp_path / "killed"))
    os.remove(os.path.join(out, "trials.parquet"))
    os.remove(os.path.join(out, "study-finished.json"))
    with open(os.path.join(out, "trials.json"), "w") as f:
        json.dump({"t0": {"status": "stopped", "epochs": 1}, "t1": {"status": "running", "epochs": 4}}, f)
    study = load_study(out)
    assert study.unfinished and {t["trial_id"]: t.get("status") for t in summaries(study)}["t1"] == "running"
    from ray_cifar.report.page import build, trials_section

    section = trials_section(study, build(study, str(tmp_path / "r")))
    assert section.notes[0].startswith("**Not finished**: the study has no trials.parquet yet") and \
        "2 trial(s) so far, 1 of them unfinished" in section.notes[0]
    assert "--resume OUTPUT" in section.notes[0]  # loaded alone: the placeholder; the command names the study
    assert main([out]) == 0 and f"python -m ray_cifar.tune --resume {out}` goes on" in \
        open(os.path.join(out, "report.md")).read()
    assert "status" in section.columns
    assert not load_study(make_output(str(tmp_path / "done"))).unfinished
    open(os.path.join(out, "config.yaml"), "w").close()
    assert main([out]) == 2
    assert "config.yaml is damaged (empty)" in capsys.readouterr().err


@needs_matplotlib
def test_throughput_is_the_median_and_a_diverging_trial_does_not_flatten_the_loss_axis(tmp_path, monkeypatch):
    """The figure's "median over epochs" was the upper middle value of an even count; the loss axis went up to a
    diverging trial's last finite loss (2.8e27), every other trial a flat line along its foot."""
    import math

    from ray_cifar.report import figures

    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig) or path)
    rows = [{"trial_id": "a", "epoch": e, "images_per_second": v, "train_loss": 2.3 / e, "val_acc": 0.3 * e}
            for e, v in ((1, 400.0), (2, 1000.0), (3, 1200.0), (4, 1400.0))]
    rows += [{"trial_id": "b", "epoch": 1, "train_loss": 2.4, "val_acc": 0.1},
             {"trial_id": "b", "epoch": 2, "train_loss": 2.8e27, "val_acc": 0.1},
             {"trial_id": "b", "epoch": 3, "train_loss": math.nan, "val_acc": 0.1, "diverged": True}]
    trials = [{"trial_id": t, "label": t, "point": t} for t in ("a", "b")]
    figures.plot_throughput(rows, trials, str(tmp_path / "t.png"))
    assert [bar.get_width() for bar in saved[0].axes[0].patches] == [1100.0, 0.0]
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    figures.plot_curves(rows, trials, str(tmp_path / "c.png"))
    loss_axis = saved[-1].axes[1]
    assert loss_axis.get_ylim()[1] < 10 and "1 epoch(s) of diverging trials above the axis" in loss_axis.get_title()
    assert all(float(tick).is_integer() for tick in saved[-1].axes[0].get_xticks())


@needs_matplotlib
def test_figures_of_points_mark_the_trials_asha_stopped_early(tmp_path, monkeypatch):
    """The heatmap's cell "19.8, n=2" averaged two trials ASHA stopped after 2 epochs and stood beside cells of
    6-epoch trials, and the per-field figure drew them alike: a gap of budget read as a gap of values."""
    from ray_cifar.report import build, figures, page, tables

    trials = [{"trial_id": f"t{i}", "optim.lr": lr, "train.global_batch_size": batch, "epochs": epochs,
               "val_acc": acc} for i, (lr, batch, epochs, acc) in enumerate(
                   [(0.1, 128, 6, 0.32), (0.1, 256, 6, 0.30), (0.001, 128, 6, 0.25), (0.001, 256, 2, 0.20)])]
    keys = ["optim.lr", "train.global_batch_size"]
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig) or path)
    figures.plot_heatmap(trials, keys, str(tmp_path / "h.png"))
    texts = [t.get_text() for t in saved[0].axes[0].texts]
    assert "20.0\nn=1\n2 ep" in texts and "32.0\nn=1" in texts
    figures.plot_params(trials, keys, str(tmp_path / "p.png"))
    labels = [c.get_label() for c in saved[1].axes[0].collections]
    assert "trials of 6 epochs" in labels and "trials of fewer epochs (stopped early)" in labels
    # A trial whose every epoch diverged has no score: it was drawn at 0%, its point's mean too.
    trials.append({"trial_id": "t4", "optim.lr": 1000.0, "train.global_batch_size": 128, "epochs": 1,
                   "val_acc": None, "diverged": True})
    figures.plot_params(trials, keys, str(tmp_path / "p.png"))
    from matplotlib.collections import PathCollection

    ys = [y for c in saved[2].axes[0].collections if isinstance(c, PathCollection) for _, y in c.get_offsets()] + \
        [y for line in saved[2].axes[0].lines for y in line.get_ydata()]  # the trials' dots, the points' means
    assert ys and min(ys) > 0
    rows = tables.replicate_rows(trials, keys)
    assert [r[tables.VERSUS_BEST] for r in rows if r["optim.lr"] == 1000.0] == [
        "no score: no epoch of its trials scored (diverged)"]
    out = make_output(str(tmp_path / "study"))  # its lr 0.01 trials stopped at the first rung
    captions = build(load_study(out), out)["captions"]
    assert captions["params"] == captions["heatmap"] == page.FEWER_EPOCHS_CAPTION


def test_the_trials_table_says_how_precisely_the_validation_split_measures_the_best():
    """One seed a point has no interval: two trials 0.0225 apart on 400 validation images read as a ranking."""
    from ray_cifar.report import Study
    from ray_cifar.report.tables import val_noise_note

    study = Study(name="s", config=resolved_config({"data": {"val_size": 400}}), rows=[])
    trials = [{"trial_id": "a", "best_metric": 0.3625, "val_acc": 0.3625},
              {"trial_id": "b", "best_metric": 0.34, "val_acc": 0.34}, {"trial_id": "c", "best_metric": None}]
    assert val_noise_note(study, trials) == (
        "Validation noise: 400 validation images measure a val_acc near 0.3625 to about ±0.0471 (95%, binomial); the "
        "best trial's lead over the next, 0.0225, is within it: this validation split alone does not tell the two "
        "apart.")
    trials[1].update(best_metric=0.25, val_acc=0.25)
    assert val_noise_note(study, trials).endswith("the best trial's lead over the next, 0.1125, is larger than that.")
    assert val_noise_note(Study(name="s", config=resolved_config({"tune": {"metric": "val_loss", "mode": "min"}}),
                                rows=[]), trials) is None


def test_a_study_stopped_in_its_test_evaluation_says_so_not_that_every_trial_was_tested(tmp_path):
    """trials.parquet is written even when the test evaluation is stopped (its finally): the report of such a study
    said "every finished trial was evaluated once on the test split", beside test_acc "-" for all."""
    from ray_cifar.report.page import LAST_PHASE_CUT_NOTE, TEST_ALL_NOTE
    from ray_cifar.results import FINISHED

    out = make_output(str(tmp_path / "study"))
    config = yaml.safe_load(open(tmp_path / "study" / "config.yaml"))
    config["tune"]["test"] = "all"
    yaml.safe_dump(config, open(tmp_path / "study" / "config.yaml", "w"))
    (tmp_path / "study" / FINISHED).unlink()  # stopped before it was written
    assert main([out]) == 0
    md = open(os.path.join(out, "report.md")).read()
    assert LAST_PHASE_CUT_NOTE.format(location=out) in md and TEST_ALL_NOTE not in md  # (its path, not OUTPUT)
    (tmp_path / "study" / FINISHED).write_text("{}")
    assert main([out]) == 0
    md = open(os.path.join(out, "report.md")).read()
    assert "Not finished" not in md and TEST_ALL_NOTE in md


def test_a_max_steps_studys_replicates_compare_points_of_equal_steps(tmp_path):
    """With train.max_steps the length is steps: BOHB's HyperBand ended a batch-256 trial at max_t's 2 epochs, 12 of
    its 90 steps, beside batch-32 trials that ran their 90 steps in 2 epochs, and Welch's test compared the two as
    equal budgets (both 2 epochs). In a comparison, each study's trials in its own unit (the first's spoke for all)."""
    from ray_cifar.report import Study, build, combine
    from ray_cifar.report.tables import VERSUS_BEST, replicate_rows

    trials = [{"train.global_batch_size": batch, "train.seed": seed, "epochs": 2, "budget": steps, "val_acc": acc}
              for batch, steps, accs in ((32, 90, (0.40, 0.42)), (256, 12, (0.30, 0.31))) for seed, acc in enumerate(accs)]
    rows = replicate_rows(trials, ["train.global_batch_size"], "steps")
    assert [r["steps"] for r in rows] == ["90", "12"]
    assert rows[1][VERSUS_BEST] == "not compared: steps 12 against the best's 90"
    by_epochs = [{k: v for k, v in t.items() if k != "budget"} for t in trials]
    assert replicate_rows(by_epochs, ["train.global_batch_size"])[1][VERSUS_BEST].startswith("worse")  # 2 = 2 epochs
    assert Study("s", {"train": {"max_steps": 90}}, []).budget == "steps_run"
    assert Study("s", {"train": {"epochs": 30}}, []).budget == "epochs"
    # A comparison: each study's trials in its own unit (the first study's config spoke for all).
    steps_study = make_output(str(tmp_path / "steps"))
    with open(os.path.join(steps_study, "config.yaml")) as f:
        text = f.read()
    with open(os.path.join(steps_study, "config.yaml"), "w") as f:
        f.write(text.replace("  max_steps: null\n", "  max_steps: 1000\n", 1))
    study = load_study(steps_study)
    assert study.budget == "steps_run"
    rows = [{**r, "steps": 10 * r["epoch"]} for r in study.rows]  # cumulative optimizer steps
    study.rows[:] = rows
    built = build(combine([load_study(make_output(str(tmp_path / "epochs"))), study]), str(tmp_path / "cmp"))
    assert {(t["study"], t["budget"] == (10 * t["epochs"] if t["study"] == "steps" else t["epochs"]))
            for t in built["trials"]} == {("steps", True), ("epochs", True)}
    assert "epochs or steps" in built["replicates"][0]


def test_a_copy_of_a_studys_config_and_rows_alone_is_not_reported_as_finished_and_tested(tmp_path):
    """config.yaml and results.parquet alone (a partial copy): the report claimed every finished trial was evaluated
    on the test split (tune.test all) beside test_acc "-" everywhere, and said nothing of the missing table."""
    import shutil

    out = make_output(str(tmp_path / "study"))
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.yaml", "results.parquet"):
        shutil.copy(os.path.join(out, name), copy / name)
    with open(copy / "config.yaml") as f:
        text = f.read()
    with open(copy / "config.yaml", "w") as f:
        f.write(text.replace("  test: best\n", "  test: all\n", 1))
    assert main([str(copy)]) == 0
    md = open(copy / "report.md").read()
    assert "**Not finished**: the study has no trials.parquet yet" in md and "nor a trials.json" in md
    assert "every finished trial was evaluated" not in md


@needs_matplotlib
def test_a_study_of_many_trials_draws_the_best_and_counts_the_rest(tmp_path, monkeypatch):
    """A bar a trial: a 400-trial study's ranking, throughput and stops were 11,000 px tall each (78,000 px and
    10 MB at 2,800 trials, a 2-minute report), and its curves' legend named every point. Past MAX_BARS trials the
    bar figures draw the best, the stops are counts by epochs run, and the curves colour the best points alone."""
    from ray_cifar.report import figures

    n = figures.MAX_BARS + 10
    trials = [{"trial_id": f"t{i}", "label": f"t{i}", "point": f"p{i // 2}", "best_metric": 0.9 - i / 1000,
               "epochs": 4 if i < 5 else 1 + i % 2, "status": "completed" if i < 5 else "stopped"}
              for i in range(n)]  # best first, two seeds a point
    trials[-1]["status"] = None  # a status the figure has no colour for
    rows = [{"trial_id": t["trial_id"], "epoch": e, "val_acc": 0.5 + e / 10, "train_loss": 2 / e,
             "images_per_second": 1000.0} for t in trials for e in range(1, t["epochs"] + 1)]
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig) or path)
    figures.plot_ranking(trials, "val_acc", "max", str(tmp_path / "r.png"))
    figures.plot_throughput(rows, trials, str(tmp_path / "t.png"))
    for fig in saved:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == [f"t{i}" for i in range(figures.MAX_BARS)]
        assert ax.get_title().endswith(f": the best {figures.MAX_BARS} of {n} trials (the trials table lists all)")
    tune = {"scheduler": "asha", "grace_period": 1, "reduction_factor": 2}
    figures.plot_asha(trials, tune, 4, str(tmp_path / "a.png"))
    ax = saved[-1].axes[0]
    heights = {}  # (epochs run, status) -> trials
    for bars in ax.containers:
        for bar in bars:
            if bar.get_height():
                heights[(round(bar.get_x() + bar.get_width() / 2), bars.get_label())] = bar.get_height()
    assert heights == {(4, "completed"): 5, (1, "stopped"): 22, (2, "stopped"): 22, (2, "no status yet"): 1}
    assert sorted({line.get_xdata()[0] for line in ax.lines}) == [1, 2, 4]  # rungs 1 and 2, max 4
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    figures.plot_curves(rows, trials, str(tmp_path / "c.png"))
    lines = saved[-1].axes[0].lines
    coloured = [line for line in lines if line.get_color() != "lightgrey"]
    assert len(coloured) == 2 * figures.MAX_COLOURED  # the best MAX_COLOURED points, two trials each
    assert len(lines) - len(coloured) == n - 2 * figures.MAX_COLOURED
    legend = [t.get_text() for t in saved[-1].legends[0].get_texts()]
    points = n // 2
    assert legend == [f"p{i}" for i in range(figures.MAX_COLOURED)] + [f"the other {points - figures.MAX_COLOURED} "
                                                                       "points"]
