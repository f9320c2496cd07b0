"""benchmarks/asha_fidelity.py --smoke on a real (tiny) replicated two-field study, run once for the module:
the comparison JSON and PNG, tune.test all's test figure on every finished trial beside its published
figure, and the report's intervals, significance column, heatmap and every other figure; and the comparison alone on two
hand-made outputs, figure by figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two searched fields (lr x batch), two seeds a point; lr 1e-7 learns nothing, so ASHA has clear losers. Its model
# and length are --smoke's (asha_fidelity.SMOKE_SETS): a published figure is of its own run (its entries' run).
STUDY = """
model: {name: resnet, blocks: [1, 1], widths: [8, 16], stem_width: 8}
train: {epochs: 3}
data: {train_subset: 500}
tune:
  num_samples: 2
  test: all
  search_space:
    optim.lr: {grid: [0.05, 0.0000001]}
    train.global_batch_size: {grid: [50, 100]}
published:
  - {where: {optim.lr: 0.05, train.global_batch_size: 50}, value: 80.0, metric: test_acc, source: "a figure for this test"}
  - {where: {optim.lr: 0.0000001, train.global_batch_size: 100}, value: 11.0, metric: test_acc, source: "another one"}
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, synthetic_parquet_dir):
    folder = tmp_path_factory.mktemp("asha_fidelity")
    (folder / "study.yaml").write_text(STUDY)
    env = {**os.environ, "RAY_CIFAR_CACHE": str(folder / "cache")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "asha_fidelity.py"), "--smoke",
                             "--config", str(folder / "study.yaml"), "--data", synthetic_parquet_dir,
                             "--out", str(folder / "out"), "--top-k", "2"],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = folder / "out"
    return {"out": out, "json": json.loads((out / "asha_fidelity_smoke.json").read_text()),
            "grid": out / "asha_fidelity_smoke-runs" / "grid", "asha": out / "asha_fidelity_smoke-runs" / "asha",
            "stdout": result.stdout}


@pytest.mark.integration
def test_the_comparison_has_every_figure_the_issue_asks_for(smoke):
    c = smoke["json"]["comparison"]
    assert (c["points"], c["trials"], c["seeds_per_point"]) == (4, 8, [2])
    best = c["best"]
    # lr 1e-7 learns nothing: both runs' best is an lr 0.05 point, and the noise test says how sure
    assert best["grid_best_point"].startswith("lr=0.05") and best["asha_pick_point"].startswith("lr=0.05")
    assert best["same_point"] == (best["asha_pick_point"] == best["grid_best_point"])
    assert best["within_noise"] is True or 0 <= best["welch_p"] < 0.05
    assert 0 <= c["top_k"]["overlap"] <= c["top_k"]["k"] == 2 and len(c["top_k"]["grid_top"]) == 2
    assert "Spearman" in c["rank_correlation_ran_to_end"]["what"]
    # ASHA stopped trials, so it trained fewer epochs than the grid's 8 trials x 3
    cost = c["cost"]
    assert cost["grid_epochs"] == 24 and cost["asha_epochs"] < 24 and cost["asha_stopped"] >= 1
    assert cost["asha_ran_to_end"] + cost["asha_stopped"] == 8 and 0 < cost["wall_fraction"]
    assert all(r["grid_rank"] <= 2 for r in c["regret"]["stopped_in_grid_top_k"])
    # the same trial run to the end by both is the same computation
    assert c["rank_correlation_ran_to_end"]["max_abs_difference_same_trial"] == pytest.approx(0.0, abs=1e-6)
    ranks = [t["grid_rank"] for t in c["per_trial"]]
    assert ranks == list(range(1, 9)) and {t["asha_status"] for t in c["per_trial"]} <= {"completed", "stopped"}
    runs = smoke["json"]["runs"]
    assert all("load_average_1min_before" in runs[r] and runs[r]["wall_seconds"] > 0 for r in ("grid", "asha"))
    with Image.open(smoke["out"] / "asha_fidelity_smoke.png") as img:
        img.verify()
    assert "top-2 overlap" in smoke["stdout"]


@pytest.mark.integration
def test_tune_test_all_puts_a_test_figure_on_every_finished_trial_beside_its_published_one(smoke):
    for run in ("grid", "asha"):  # ASHA's stopped trials are finished too: each at its best epoch so far
        trials = pq.read_table(smoke[run] / "trials.parquet").to_pylist()
        assert len(trials) == 8 and all(t["status"] in ("completed", "stopped") for t in trials)
        assert all(t["test_acc"] is not None and 0 <= t["test_acc"] <= 1 for t in trials)
    md = (smoke["grid"] / "report.md").read_text()
    published = md.split("## Published figures")[1].split("## ")[0]
    rows = [line for line in published.splitlines() if line.startswith("| lr=")]
    assert len(rows) == 4  # two seeds of each of the two published points, each with its own test figure
    assert all(line.split("|")[4].strip() not in ("", "-") for line in rows)  # "ours %"
    assert "no test figure chose any trial" in md


@pytest.mark.integration
def test_the_report_of_a_replicated_two_field_study_has_intervals_significance_and_a_heatmap(smoke):
    from ray_cifar.report.tables import NOISE_NOTE, VERSUS_BEST

    md = (smoke["grid"] / "report.md").read_text()
    table = md.split("## Replicates")[1].split("## ")[0]
    header = next(line for line in table.splitlines() if line.startswith("| optim.lr"))
    assert "95% CI (t)" in header and VERSUS_BEST in header and "test_acc % (mean ± std)" in header
    rows = [line for line in table.splitlines() if line.startswith("| 0.05") or line.startswith("| 1e-07")]
    assert len(rows) == 4 and sum("| best |" in line for line in rows) == 1
    assert all("n=2" in line and "[" in line for line in rows)  # an interval on every point (two seeds)
    assert NOISE_NOTE.split(".")[0] in md
    heatmap = smoke["grid"] / "figures" / "heatmap.png"
    with Image.open(heatmap) as img:
        img.verify()
        assert img.size[1] > 200  # a drawn grid, not the one-line "no pair" placeholder
    assert 'src="figures/heatmap.png"' in (smoke["grid"] / "report.html").read_text()
    # The report the study wrote at its end (ASHA's run: stopped trials, rungs) has every figure, each on its page.
    from ray_cifar.report import FIGURES

    page = (smoke["asha"] / "report.html").read_text()
    for name in FIGURES:
        with Image.open(smoke["asha"] / "figures" / f"{name}.png") as img:
            img.verify()
        assert f'src="figures/{name}.png"' in page, name


# --- The comparison alone, on two hand-made outputs (no training): exact figures ---

def _output(folder, curves: dict, stopped: set) -> str:
    """A study output: config.yaml, results (one row per epoch of each trial) and trials.parquet."""
    import yaml

    from ray_cifar.results import ResultsLog, write_rows

    from conftest import resolved_config

    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(resolved_config({"tune": {"metric": "val_acc", "mode": "max", "scheduler": "asha"}}), f)
    rows, trials = [], []
    for i, ((lr, seed), curve) in enumerate(curves.items()):
        rows += [{"trial_id": f"t{i}", "epoch": e, "optim.lr": lr, "train.seed": seed, "val_acc": v}
                 for e, v in enumerate(curve, 1)]
        trials.append({"trial_id": f"t{i}", "optim.lr": lr, "train.seed": seed, "epochs": len(curve),
                       "status": "stopped" if (lr, seed) in stopped else "completed"})
    ResultsLog(folder).append(rows)
    write_rows(trials, os.path.join(folder, "trials.parquet"))
    return folder


def test_compare_counts_best_top_k_regret_correlation_and_cost_exactly(tmp_path):
    from scipy import stats

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from asha_fidelity import compare

    grid = {(0.1, 0): [0.50, 0.70, 0.80], (0.1, 1): [0.40, 0.60, 0.78],   # the best point, mean 0.79
            (0.2, 0): [0.60, 0.70, 0.76], (0.2, 1): [0.55, 0.65, 0.74],   # mean 0.75, ASHA's pick below
            (0.3, 0): [0.30, 0.40, 0.50], (0.3, 1): [0.35, 0.45, 0.52]}
    stopped = {(0.1, 1), (0.3, 0), (0.3, 1)}  # ASHA stops the slow starter of the best point, and lr 0.3
    asha = {k: (v[:1] if k in stopped else v) for k, v in grid.items()}
    c = compare(_output(str(tmp_path / "grid"), grid, set()), _output(str(tmp_path / "asha"), asha, stopped), 2)
    best = c["best"]
    assert best["grid_best_point"] == "lr=0.1" and best["asha_best_trial"] == "lr=0.1 seed=0"
    assert best["same_point"] and best["same_trial"]
    assert c["top_k"]["grid_top"] == ["lr=0.1 seed=0", "lr=0.1 seed=1"]
    assert c["top_k"]["asha_top"] == ["lr=0.1 seed=0", "lr=0.2 seed=0"] and c["top_k"]["overlap"] == 1
    assert c["regret"]["stopped_in_grid_top_k"] == [
        {"trial": "lr=0.1 seed=1", "grid_rank": 2, "grid_value": 0.78, "asha_stopped_after_epoch": 1,
         "asha_value_when_stopped": 0.40}]
    assert c["cost"] == {"grid_epochs": 18, "asha_epochs": 12, "epochs_fraction": round(12 / 18, 4),
                         "asha_ran_to_end": 3, "asha_stopped": 3}
    ended = c["rank_correlation_ran_to_end"]
    assert (ended["n"], ended["spearman_rho"], ended["max_abs_difference_same_trial"]) == (3, 1.0, 0.0)
    every = c["rank_correlation_all_trials"]
    keys = sorted(grid)
    asha_figures, grid_figures = [max(asha[k]) for k in keys], [max(grid[k]) for k in keys]
    assert every["spearman_rho"] == pytest.approx(stats.spearmanr(asha_figures, grid_figures).statistic, abs=1e-4)
    assert every["kendall_tau_b"] == pytest.approx(stats.kendalltau(asha_figures, grid_figures).statistic, abs=1e-4)

    # ASHA picking a different point: its gap to the grid's best is judged on the grid's seed replicates
    asha[(0.1, 0)] = [0.50]
    stopped.add((0.1, 0))
    c = compare(str(tmp_path / "grid"), _output(str(tmp_path / "asha2"), asha, stopped), 2)
    assert c["best"]["asha_pick_point"] == "lr=0.2" and not c["best"]["same_point"]
    p = stats.ttest_ind([0.76, 0.74], [0.80, 0.78], equal_var=False).pvalue
    assert c["best"]["welch_p"] == pytest.approx(p) and c["best"]["within_noise"] == (p >= 0.05)
    assert c["regret"]["grid_best_trial_stopped"] is True
