"""Where a study's time goes: its wall time against its trials' own train and eval time.

    python benchmarks/study_overhead.py --data ../shared/data/cifar10 --label after
    python benchmarks/study_overhead.py --data DIR --label before --code /tmp/ft   # another checkout's code
    python benchmarks/study_overhead.py --report                                   # table + PNG from the JSON

Each variant runs the --smoke-test study (2-rank DDP trials, tiny ResNet, 8,000 train images,
ASHA) as a subprocess, `python -m ray_cifar.tune`, with --code's ray_cifar on PYTHONPATH, and reads
its results.parquet. Per run it records:

- wall_seconds: the whole command (Python and Ray start, every trial, the test evaluation, the report);
- train_seconds / eval_seconds: the sums over every trial-epoch of epoch_seconds / eval_seconds;
- overhead_fraction: 1 - (train + eval) / wall, the share of the wall time no trial trained or evaluated
  (with trials side by side the sums can exceed the wall time);
- study_images_per_second: train images of all trials / wall_seconds;
- alone_images_per_second: the median images_per_second of epochs >= 2 of the same label's
  sequential smoke run (one trial alone at steady state; for the 1-rank variants, the 1-rank one);
- study_vs_alone: their ratio, issue 9's whole-study figure (goal >= 0.70);
- startup_seconds (per trial, trial start -> first step) and, where the code records them, the
  per-phase `timing_*_seconds` columns (median over trials) and the driver-side gaps (before the
  first trial, between trials, after the last report).

Results accumulate in benchmarks/results/study_overhead_cpu.json (one entry per label and variant,
a rerun replaces its entry); --report writes study_overhead_cpu.png and prints the README table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "study_overhead_cpu.json")
PLOT = os.path.join(HERE, "results", "study_overhead_cpu.png")

# name -> (--set overrides, what it varies). Packed runs need a Ray with room for two 2-rank trials.
PACKED = ["tune.max_concurrent_trials=2", "tune.num_cpus=5"]
VARIANTS = {
    # One at a time is --smoke-test's default on 2 cores; said explicitly (session-1 runs have sets []).
    "smoke": (["tune.max_concurrent_trials=1"], "the smoke study: 4 trials, ASHA, up to 6 epochs, one trial at a time"),
    "smoke-2ep": (["train.epochs=2", "tune.max_concurrent_trials=1"], "4 trials, up to 2 epochs each, one at a time"),
    "smoke-packed": (PACKED, "the smoke study, two trials side by side"),
    "smoke-2ep-packed": (["train.epochs=2", *PACKED], "4 trials, up to 2 epochs, two side by side"),
    # One rank per trial: the trial trains in its Tune trial process (no Train controller or worker group).
    "smoke-1rank": (["train.num_workers=1", "tune.max_concurrent_trials=1"],
                    "the smoke study with 1-rank trials, one at a time"),
    "smoke-1rank-packed": (["train.num_workers=1"], "1-rank trials, as many at once as the cores fit (2)"),
}
REFERENCE = "smoke"  # the variant whose steady-state epochs give 'one trial alone'
# ... per variant where it is another: a 1-rank study against one 1-rank trial alone.
REFERENCES = {"smoke-1rank": "smoke-1rank", "smoke-1rank-packed": "smoke-1rank"}


def run_study(code: str, data: str, sets: list[str], output: str) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": code}
    command = [sys.executable, "-m", "ray_cifar.tune", "--smoke-test", "--data", data, "--output", output]
    for s in sets:
        command += ["--set", s]
    for attempt in range(2):  # on a loaded machine Ray's own start can time out: try once more
        shutil.rmtree(output, ignore_errors=True)
        os.makedirs(output)
        start = time.time()
        done = subprocess.run(command, env=env, cwd=code, stdout=subprocess.DEVNULL)
        if done.returncode == 0:
            return start, time.time()
    raise RuntimeError(f"{' '.join(command)} failed twice (exit {done.returncode})")


def study_phases(trials: dict[str, list[dict]], start: float, end: float) -> dict:
    """Driver-side gaps from the rows' clocks: before the first trial (Python, data check, Ray start,
    Tune), between one trial's last report and the next trial's start (teardown + scheduling), and
    after the last report (test evaluation, report, Ray shutdown)."""
    spans = sorted((min(r["timing_trial_started_at"] for r in rows if r.get("timing_trial_started_at")),
                    max(r["time"] for r in rows)) for rows in trials.values()
                   if any(r.get("timing_trial_started_at") for r in rows))
    if not spans:
        return {}
    gaps = [max(0.0, b[0] - max(e for _, e in spans[:i + 1])) for i, b in enumerate(spans[1:])]
    return {"before_first_trial": round(spans[0][0] - start, 1), "between_trials_total": round(sum(gaps), 1),
            "after_last_report": round(end - max(e for _, e in spans), 1)}


def summarize(output: str, start: float, end: float) -> dict:
    import pyarrow.parquet as pq

    rows = pq.read_table(os.path.join(output, "results.parquet")).to_pylist()
    trials: dict[str, list[dict]] = {}
    for r in rows:
        trials.setdefault(r["trial_id"], []).append(r)
    train = sum(r["epoch_seconds"] for r in rows)
    evaluation = sum(r["eval_seconds"] or 0.0 for r in rows)
    images = sum(r["train_images"] for r in rows)
    steady = [r["images_per_second"] for r in rows if r["epoch"] >= 2]
    firsts = [min(t, key=lambda r: r["epoch"]) for t in trials.values()]
    phases = sorted({k for r in firsts for k in r if k.startswith("timing_") and k.endswith("_seconds")
                     and r[k] is not None})
    wall = end - start
    return {
        "trials": len(trials), "trial_epochs": len(rows), "wall_seconds": round(wall, 1),
        "train_seconds": round(train, 1), "eval_seconds": round(evaluation, 1),
        "overhead_fraction": round(1 - (train + evaluation) / wall, 3),
        "train_images": images, "study_images_per_second": round(images / wall, 1),
        "steady_images_per_second": round(statistics.median(steady), 1) if steady else None,
        "startup_seconds": [round(r["startup_seconds"], 2) for r in firsts if r.get("startup_seconds") is not None],
        "phases_median_seconds": {k: round(statistics.median(r[k] for r in firsts if r.get(k) is not None), 2)
                                  for k in phases},
        "study_phases_seconds": study_phases(trials, start, end),
    }


def load() -> dict:
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            return json.load(f)
    return {"runs": []}


def save(results: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")


def with_ratios(runs: list[dict]) -> list[dict]:
    alone = {(r["label"], r["variant"]): r["steady_images_per_second"] for r in runs}
    for r in runs:
        ref = alone.get((r["label"], REFERENCES.get(r["variant"], REFERENCE)))
        r["alone_images_per_second"] = ref
        r["study_vs_alone"] = round(r["study_images_per_second"] / ref, 3) if ref else None
    return runs


def report(results: dict) -> str:
    runs = with_ratios(results["runs"])
    lines = ["| label | variant | trials | trial-epochs | wall s | train+eval s | overhead | study img/s | "
             "alone img/s | study/alone | startup s (median) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        startup = statistics.median(r["startup_seconds"]) if r["startup_seconds"] else float("nan")
        lines.append(f"| {r['label']} | {r['variant']} | {r['trials']} | {r['trial_epochs']} | {r['wall_seconds']:.0f} | "
                     f"{r['train_seconds'] + r['eval_seconds']:.0f} | {r['overhead_fraction']:.0%} | "
                     f"{r['study_images_per_second']:,.0f} | {r['alone_images_per_second'] or float('nan'):,.0f} | "
                     f"{r['study_vs_alone'] or float('nan'):.2f} | {startup:.1f} |")
    _plot(runs)
    return "\n".join(lines)


def _plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['label']}\n{r['variant']}" for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(runs)), 4.5))
    work = [r["train_seconds"] + r["eval_seconds"] for r in runs]
    left.bar(names, [r["wall_seconds"] for r in runs], color="#bbbbbb", label="study wall time")
    left.bar(names, work, color="#4477aa", label="sum of trials' train + eval")
    left.set_ylabel("seconds")
    left.legend(fontsize=8)
    right.bar(names, [r["study_vs_alone"] or 0 for r in runs], color="#228833")
    right.axhline(0.7, color="k", ls="--", lw=1, label="goal 0.70")
    right.set_ylabel("whole-study img/s / one trial alone")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.suptitle("smoke study (2-rank CPU trials unless the variant says 1rank) on 2 cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 folder (e.g. ../shared/data/cifar10)")
    p.add_argument("--label", help="name of this code version in the results (e.g. before, after)")
    p.add_argument("--code", default=ROOT, help="checkout whose ray_cifar runs (default: this one)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--report", action="store_true", help="only write the PNG and print the table")
    args = p.parse_args()
    if args.report:
        print(report(load()))
        return 0
    if not (args.data and args.label):
        p.error("--data and --label are needed to run")
    for variant in args.variants.split(","):
        sets, what = VARIANTS[variant]
        output = tempfile.mkdtemp(prefix="study_overhead_")
        try:
            start, end = run_study(os.path.abspath(args.code), os.path.abspath(args.data), sets, output)
            entry = {"label": args.label, "variant": variant, "what": what, "sets": sets,
                     "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "load_average_1min": round(os.getloadavg()[0], 1), **summarize(output, start, end)}
        finally:
            shutil.rmtree(output, ignore_errors=True)
        results = load()
        results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
        results["runs"] = [r for r in results["runs"] if (r["label"], r["variant"]) != (args.label, variant)]
        results["runs"].append(entry)
        save(results)
        print(json.dumps(entry), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
