"""benchmarks/asha_fidelity.py --smoke on a real (tiny) replicated two-field study, run once for the module:
the comparison JSON and PNG, tune.test all's test figure on every finished trial beside its published
figure, and the report's intervals, significance column and heatmap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two searched fields (lr x batch), two seeds a point; lr 1e-7 learns nothing, so ASHA has clear losers.
STUDY = """
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


def test_the_report_of_a_replicated_two_field_study_has_intervals_significance_and_a_heatmap(smoke):
    from ray_cifar.report import NOISE_NOTE, VERSUS_BEST

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
