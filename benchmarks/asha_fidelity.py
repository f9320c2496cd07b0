"""Does ASHA pick what the full grid picks? One search space, run twice on the same seeds and data:
every trial to its end (tune.scheduler=fifo, "the grid") and under ASHA, then compared.

    python benchmarks/asha_fidelity.py --data ../shared/data/cifar10                   # the CPU space (asha_fidelity_cpu.yaml)
    python benchmarks/asha_fidelity.py --config studies/adam_batch_lr_grid.yaml --seeds 2 \\
        --budget-scale 0.2 --data DIR --name asha_fidelity_adam_gpu                       # a seed study on a GPU
    python benchmarks/asha_fidelity.py --smoke --data DIR --out /tmp/af                  # seconds: what the tests run

Both runs are real studies (`python -m ray_cifar.tune`, one subprocess each, the same --config and
--set), so ASHA's run reuses nothing of the grid's. Compared, by the study's tune.metric/tune.mode
(each trial's best epoch), a trial being one (point, train.seed):

- best: is ASHA's best trial's point the grid's best point (by the mean over seeds), and if not, is
  it within the noise: Welch's two-sided t-test on the grid's seed replicates of the two points;
- top-k: how many of the grid's k best trials are among ASHA's k best;
- rank correlation among the trials ASHA ran to the end: Spearman's rho and Kendall's tau-b of
  ASHA's figure against the grid's (the same trial twice; on CPU the runs are the same computation,
  so this also checks that they are);
- regret: the trials ASHA stopped that finished in the grid's top k, where it stopped them;
- cost: epochs trained and wall time of the ASHA run as a fraction of the grid's.

Also: the same two correlations over every trial (ASHA's figure when it stopped a trial against the
grid's final figure: how well what ASHA judged on predicts the end). `--reanalyse OUT/<name>.json`
recomputes the comparison and the PNG from the runs it names, without training.

Writes OUT/<name>.json and OUT/<name>.png (each trial's grid figure, best first, coloured by ASHA's
decision) and keeps both studies under OUT/<name>-runs/ (grid/, asha/, each with its report).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_pipeline import write_json  # noqa: E402

from ray_cifar.report import Study, load_study, point_label, summaries  # noqa: E402
from ray_cifar.results import SEED_KEY, metric_value, searched_columns, welch_p_value  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SPACE = os.path.join(HERE, "asha_fidelity_cpu.yaml")
SIGNIFICANCE = 0.05
# --smoke: a tiny net, 3 epochs, 500 train / 100 val images of --data (synthetic in the tests), 1-rank trials, and
# no Ray dashboard for its two studies (one-rank trials need none).
SMOKE_SETS = ["model.name=resnet", "model.blocks=[1,1]", "model.widths=[8,16]", "model.stem_width=8",
              "data.train_subset=500", "data.val_size=100", "data.pipeline=torch", "train.epochs=3",
              "train.num_workers=1", "train.eval_batch_size=500", "tune.grace_period=1", "tune.reduction_factor=2",
              "tune.dashboard=false"]


def fail(message: str) -> None:
    """A user's mistake: one line on stderr, exit status 2."""
    print(f"asha_fidelity: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CPU_SPACE, help="the study file whose space is compared (default: the CPU space)")
    p.add_argument("--data", default=os.environ.get("RAY_CIFAR_DATA"), help="CIFAR-10 folder (default $RAY_CIFAR_DATA)")
    p.add_argument("--seeds", type=int, default=None, help="train.seed replicates per point (tune.num_samples); "
                   "default: the study's")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs of every trial (default: the study's)")
    p.add_argument("--budget-scale", type=float, default=None, help="every length times X (passed to ray_cifar.tune)")
    p.add_argument("--grace-period", type=int, default=None, help="tune.grace_period of the ASHA run")
    p.add_argument("--reduction-factor", type=float, default=None, help="tune.reduction_factor of the ASHA run")
    p.add_argument("--top-k", type=int, default=3, help="the k of top-k overlap and regret (trials)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both runs (repeatable)")
    p.add_argument("--smoke", action="store_true", help="a tiny net, 3 epochs, 1-rank trials: seconds, for tests")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of the JSON, PNG and the runs")
    p.add_argument("--name", default=None, help="results file name (default asha_fidelity_cpu, or _smoke)")
    p.add_argument("--reanalyse", metavar="JSON", help="recompute the comparison of a results file's runs (no training)")
    args = p.parse_args(argv)
    if args.reanalyse:
        return args
    if not args.data:
        p.error("--data DIR (or $RAY_CIFAR_DATA) is required")
    args.config = os.path.abspath(args.config)
    if "://" not in args.data:
        args.data = os.path.abspath(args.data)
    args.name = args.name or ("asha_fidelity_smoke" if args.smoke else "asha_fidelity_cpu")
    return args


def study_sets(args: argparse.Namespace) -> list[str]:
    """The --set overrides both runs share (the scheduler is added per run)."""
    sets = list(SMOKE_SETS) if args.smoke else []
    if args.seeds is not None:
        sets.append(f"tune.num_samples={args.seeds}")
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    if args.grace_period is not None:
        sets.append(f"tune.grace_period={args.grace_period}")
    if args.reduction_factor is not None:
        sets.append(f"tune.reduction_factor={args.reduction_factor}")
    return sets + args.sets


def run_study(args: argparse.Namespace, scheduler: str, output: str) -> dict[str, Any]:
    """One real study in its own process; its output, wall time and the load average around it."""
    cmd = [sys.executable, "-m", "ray_cifar.tune", "--config", args.config, "--data", args.data, "--output", output]
    for s in study_sets(args) + [f"tune.scheduler={scheduler}"]:
        cmd += ["--set", s]
    if args.budget_scale is not None:
        cmd += ["--budget-scale", str(args.budget_scale)]
    print(f"[asha_fidelity] {scheduler}: {' '.join(cmd[1:])}", flush=True)
    load_before, start = os.getloadavg()[0], time.time()
    with open(f"{output}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(HERE)).returncode
    wall = time.time() - start
    if rc != 0:
        print(f"asha_fidelity: the {scheduler} study failed (exit {rc}); see {output}.log", file=sys.stderr)
        sys.exit(1)
    print(f"[asha_fidelity] {scheduler}: {wall:.0f} s", flush=True)
    return {"output": output, "wall_seconds": round(wall, 1), "load_average_1min_before": round(load_before, 2),
            "load_average_1min_after": round(os.getloadavg()[0], 2)}


# --- The comparison: only the two outputs' Parquet files and config.yaml ---

def trials_by_key(study: Study) -> tuple[dict[tuple[str, Any], dict[str, Any]], list[str]]:
    """Each trial's summary (best epoch by tune.metric, status, epochs), keyed by (point label, seed)."""
    keys = searched_columns(study.rows)
    out = {}
    for t in summaries(study):
        t["point"] = point_label(t, keys)
        t["trained_epochs"] = sum(1 for r in study.rows if r.get("trial_id") == t["trial_id"])
        out[(t["point"], t.get(SEED_KEY))] = t
    return out, keys


def ranked_keys(trials: dict[tuple, dict[str, Any]], mode: str) -> list[tuple]:
    """Trial keys best first by best_metric (None last)."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(trials, key=lambda k: (trials[k]["best_metric"] is None, sign * (trials[k]["best_metric"] or 0.0)))


def point_values(trials: dict[tuple, dict[str, Any]]) -> dict[str, list[float]]:
    points: dict[str, list[float]] = {}
    for (point, _), t in trials.items():
        if t["best_metric"] is not None:
            points.setdefault(point, []).append(t["best_metric"])
    return points


def rank_correlation(xs: list[float], ys: list[float]) -> dict[str, Any]:
    from scipy.stats import kendalltau, spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return {"n": len(xs), "spearman_rho": None, "kendall_tau_b": None,
                "note": "fewer than 3 trials (or no spread): no correlation"}
    rho, tau = spearmanr(xs, ys), kendalltau(xs, ys)  # kendalltau is tau-b (ties counted)
    return {"n": len(xs), "spearman_rho": round(float(rho.statistic), 4), "spearman_p": round(float(rho.pvalue), 4),
            "kendall_tau_b": round(float(tau.statistic), 4), "kendall_p": round(float(tau.pvalue), 4)}


def compare(grid_dir: str, asha_dir: str, top_k: int) -> dict[str, Any]:
    grid_study, asha_study = load_study(grid_dir), load_study(asha_dir)
    metric, mode = grid_study.metric, grid_study.mode
    grid, keys = trials_by_key(grid_study)
    asha, _ = trials_by_key(asha_study)
    if set(grid) != set(asha):
        fail(f"the two runs have different trials: {sorted(set(grid) ^ set(asha))}")
    grid_rank, asha_rank = ranked_keys(grid, mode), ranked_keys(asha, mode)
    points = point_values(grid)
    means = {p: sum(v) / len(v) for p, v in points.items()}
    grid_best_point = max(means, key=means.get) if mode == "max" else min(means, key=means.get)
    asha_pick = asha[asha_rank[0]]["point"]
    p_value = welch_p_value(points[asha_pick], points[grid_best_point]) if asha_pick != grid_best_point else 1.0
    k = min(top_k, len(grid))
    grid_top, asha_top = set(grid_rank[:k]), set(asha_rank[:k])
    ran_to_end = [key for key in grid if asha[key].get("status") == "completed"]
    stopped = [key for key in grid if asha[key].get("status") == "stopped"]
    regret = [{"trial": _name(key), "grid_rank": grid_rank.index(key) + 1, "grid_value": grid[key]["best_metric"],
               "asha_stopped_after_epoch": asha[key]["epochs"], "asha_value_when_stopped": asha[key]["best_metric"]}
              for key in grid_rank[:k] if key in stopped]
    same_run = [abs(asha[key]["best_metric"] - grid[key]["best_metric"]) for key in ran_to_end
                if asha[key]["best_metric"] is not None and grid[key]["best_metric"] is not None]
    grid_epochs = sum(t["trained_epochs"] for t in grid.values())
    asha_epochs = sum(t["trained_epochs"] for t in asha.values())
    return {
        "metric": metric, "mode": mode, "searched": keys, "points": len(points), "trials": len(grid),
        "seeds_per_point": sorted({len(v) for v in points.values()}),
        "best": {
            "grid_best_point": grid_best_point, "grid_best_mean": means[grid_best_point],
            "grid_best_values": points[grid_best_point],
            "asha_best_trial": _name(asha_rank[0]), "asha_best_value": asha[asha_rank[0]]["best_metric"],
            "asha_pick_point": asha_pick, "asha_pick_grid_mean": means[asha_pick],
            "asha_pick_grid_values": points[asha_pick],
            "same_point": asha_pick == grid_best_point, "same_trial": asha_rank[0] == grid_rank[0],
            "gap_in_grid_mean": abs(means[grid_best_point] - means[asha_pick]),
            "welch_p": p_value,
            "within_noise": None if p_value is None else p_value >= SIGNIFICANCE,
            "test": f"Welch's two-sided t-test on the grid's seed replicates of the two points; within noise: p >= "
                    f"{SIGNIFICANCE} (None: a point with one seed)"},
        "top_k": {"k": k, "grid_top": [_name(x) for x in grid_rank[:k]], "asha_top": [_name(x) for x in asha_rank[:k]],
                  "overlap": len(grid_top & asha_top), "overlap_fraction": len(grid_top & asha_top) / k},
        "rank_correlation_ran_to_end": {
            **rank_correlation([asha[x]["best_metric"] for x in ran_to_end], [grid[x]["best_metric"] for x in ran_to_end]),
            "what": "Spearman rho and Kendall tau-b (scipy.stats) of ASHA's figure vs the grid's, over the trials "
                    "ASHA ran to the end",
            "max_abs_difference_same_trial": max(same_run) if same_run else None},
        "rank_correlation_all_trials": {
            **rank_correlation([asha[x]["best_metric"] for x in grid], [grid[x]["best_metric"] for x in grid]),
            "what": "the same over every trial: ASHA's figure when it stopped the trial (or at its end) vs the grid's "
                    "at the end, i.e. how well what ASHA judged on predicts the final ranking"},
        "regret": {"stopped_in_grid_top_k": regret, "count": len(regret),
                   "grid_best_trial_stopped": grid_rank[0] in stopped},
        "cost": {"grid_epochs": grid_epochs, "asha_epochs": asha_epochs,
                 "epochs_fraction": round(asha_epochs / grid_epochs, 4) if grid_epochs else None,
                 "asha_ran_to_end": len(ran_to_end), "asha_stopped": len(stopped)},
        "per_trial": [{"trial": _name(key), "grid_rank": i + 1, "grid_value": grid[key]["best_metric"],
                       "grid_test_acc": metric_value(grid[key], "test_acc"),
                       "asha_status": asha[key].get("status"), "asha_epochs": asha[key]["epochs"],
                       "asha_value": asha[key]["best_metric"], "asha_rank": asha_rank.index(key) + 1}
                      for i, key in enumerate(grid_rank)],
    }


def _name(key: tuple) -> str:
    point, seed = key
    return f"{point} seed={seed}"


def plot(result: dict[str, Any], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    trials = result["comparison"]["per_trial"]
    fig, ax = plt.subplots(figsize=(10, 0.34 * len(trials) + 2))
    color = {"completed": "tab:green", "stopped": "tab:gray"}
    values = [100 * (t["grid_value"] or 0) for t in trials]
    ax.barh(range(len(trials)), values, color=[color.get(t["asha_status"], "tab:red") for t in trials])
    ax.set_yticks(range(len(trials)), [t["trial"] for t in trials], fontsize=8)
    ax.invert_yaxis()
    for i, t in enumerate(trials):
        what = "ran to the end" if t["asha_status"] == "completed" else f"stopped after epoch {t['asha_epochs']}"
        pick = "  <- ASHA's best" if t["asha_rank"] == 1 else ""
        ax.text(values[i], i, f" {values[i]:.1f}  ASHA: {what} (rank {t['asha_rank']}){pick}", va="center", fontsize=7)
    judged = [(100 * t["asha_value"], i) for i, t in enumerate(trials) if t["asha_value"] is not None]
    if judged:
        ax.scatter(*zip(*judged), marker="|", s=120, color="black", zorder=3)
    k = result["comparison"]["top_k"]["k"]
    low = max(0.0, min(values + [v for v, _ in judged]) - 5) if values else 0
    ax.axhline(k - 0.5, color="tab:red", ls="--", lw=1)
    ax.text(low, k - 0.5, f" grid top {k} above", color="tab:red", fontsize=8, va="center",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.set_xlim(low, max(values) * 1.4 if values else 1)
    c = result["comparison"]
    ax.set_xlabel(f"grid: best {c['metric']} % of each trial run to the end (best first)")
    ax.set_title(f"ASHA vs the full grid: {'the same' if c['best']['same_point'] else 'a different'} best point, "
                 f"top-{k} overlap "
                 f"{c['top_k']['overlap']}/{k}, {100 * c['cost']['epochs_fraction']:.0f}% of the epochs, "
                 f"{100 * result['wall_fraction']:.0f}% of the wall time", fontsize=9)
    from matplotlib.lines import Line2D

    ax.legend(handles=[Patch(color="tab:green", label="ASHA ran it to the end"),
                       Patch(color="tab:gray", label="ASHA stopped it"),
                       Line2D([], [], marker="|", ls="", color="black", markersize=10,
                              label="ASHA's figure: when it stopped, or at the end")], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.06 - 1.0 / (len(trials) + 6)), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def reanalyse(path: str, top_k: int) -> int:
    """The comparison and PNG again from the runs a results file names (its wall times and loads kept)."""
    import json

    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"--reanalyse {path}: not a results file ({e})")
    folder = os.path.dirname(os.path.abspath(path))
    runs = {name: os.path.join(folder, run["output"]) for name, run in result["runs"].items()}
    missing = [r for r in runs.values() if not os.path.isfile(os.path.join(r, "config.yaml"))]
    if missing:
        fail(f"--reanalyse: the runs it names are not there ({', '.join(missing)}); the committed results "
             f"keep only the JSON and PNG")
    comparison = compare(runs["grid"], runs["asha"], top_k)
    comparison["cost"]["wall_fraction"] = result["wall_fraction"]
    result["comparison"] = comparison
    write_json(result, folder, os.path.basename(path))
    plot(result, path[: -len(".json")] + ".png")
    print(f"rewrote {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reanalyse:
        return reanalyse(args.reanalyse, args.top_k)
    runs_dir = os.path.join(os.path.abspath(args.out), f"{args.name}-runs")
    if not os.path.isfile(args.config):
        fail(f"--config {args.config}: no such file")
    if os.path.exists(runs_dir):
        fail(f"{runs_dir} exists; remove it or pick another --name")
    os.makedirs(runs_dir)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    grid = run_study(args, "fifo", os.path.join(runs_dir, "grid"))
    asha = run_study(args, "asha", os.path.join(runs_dir, "asha"))
    comparison = compare(grid["output"], asha["output"], args.top_k)
    comparison["cost"]["wall_fraction"] = round(asha["wall_seconds"] / grid["wall_seconds"], 4)
    result = {"what": "ASHA vs the full grid on one search space, same seeds and data", "when": started,
              "config": os.path.relpath(args.config, os.path.dirname(HERE)), "sets": study_sets(args),
              "budget_scale": args.budget_scale, "cpus": os.cpu_count(),
              "runs": {"grid": {**grid, "output": os.path.relpath(grid["output"], args.out)},
                       "asha": {**asha, "output": os.path.relpath(asha["output"], args.out)}},
              "wall_fraction": comparison["cost"]["wall_fraction"], "comparison": comparison}
    path = write_json(result, args.out, f"{args.name}.json")
    plot(result, os.path.join(args.out, f"{args.name}.png"))
    b = comparison["best"]
    print(f"[asha_fidelity] grid best point: {b['grid_best_point']} ({100 * b['grid_best_mean']:.2f}); ASHA's pick: "
          f"{b['asha_pick_point']} (grid mean {100 * b['asha_pick_grid_mean']:.2f}, Welch p {b['welch_p']}); "
          f"top-{comparison['top_k']['k']} overlap {comparison['top_k']['overlap']}; regret "
          f"{comparison['regret']['count']}; epochs {comparison['cost']['epochs_fraction']:.2f}, wall "
          f"{comparison['cost']['wall_fraction']:.2f} of the grid's", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
