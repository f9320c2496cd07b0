"""PNG plots of the committed benchmark results (reads only the JSON files).

    python benchmarks/plot_results.py                                               # every results/*.json it knows
    python benchmarks/plot_results.py benchmarks/results/train_throughput_cpu.json  # one file; the PNG beside it

Needs matplotlib (not a ray_cifar dependency: `pip install matplotlib` in any environment).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def plot_train_throughput(data: dict, ax) -> None:
    rows = data["results"]
    names = [r["variant"] for r in rows]
    ips = [r["images_per_second"] for r in rows]
    bars = ax.barh(names, ips, color=["gray"] + ["tab:blue"] * (len(rows) - 1))
    for bar, r in zip(bars, rows):
        label = f"{r['images_per_second']:,.0f} img/s  {r['vs_plain_pytorch']:.2f}x"
        if "mfu" in r:
            label += f"  MFU {r['mfu']:.1%}"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
        ax.plot(r["runs"], [bar.get_y() + bar.get_height() / 2] * len(r["runs"]), "k|", markersize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, max(ips) * 1.6)
    ax.set_xlabel("training images / s (median of repeats; ticks: each repeat)")
    ax.set_title(f"Training step, {data['model']} batch {data['batch_size']}: {data['device']}", fontsize=9)


def plot_ddp_scaling(data: dict, ax) -> None:
    rows = data["results"]
    ranks = [r["ranks"] for r in rows]
    ips = [r["images_per_second"] for r in rows]
    base = ips[0] / ranks[0]
    ax.plot(ranks, ips, "o-", label="measured")
    ax.plot(ranks, [n * base for n in ranks], "--", color="gray", label="linear")
    for n, v, r in zip(ranks, ips, rows):
        ax.annotate(f"{v:,.0f} img/s\neff. {r['scaling_efficiency']:.2f}", (n, v), textcoords="offset points",
                    xytext=(5, -25), fontsize=8)
    ax.set_xticks(ranks)
    ax.set_xlabel(f"DDP ranks ({data['backend']}), {data['batch_size_per_rank']} images per rank per step")
    ax.set_ylabel("global training images / s")
    ax.set_title(f"DDP scaling, {data['model']}: {data['device']}", fontsize=9)
    ax.legend()


PLOTS = {"train_throughput": plot_train_throughput, "ddp_scaling": plot_ddp_scaling}


def plot(path: str) -> str | None:
    kind = next((k for k in PLOTS if os.path.basename(path).startswith(k)), None)
    if kind is None:
        return None
    with open(path) as f:
        data = json.load(f)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    PLOTS[kind](data, ax)
    fig.tight_layout()
    out = path.removesuffix(".json") + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="JSON",
                        help=f"results files (default: every one in {os.path.relpath(RESULTS)} it knows)")
    args = parser.parse_args(argv)
    for path in args.paths:
        if not os.path.isfile(path):
            parser.error(f"{path}: no such file")
    for path in args.paths or sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        out = plot(path)
        if out:
            print(f"wrote {out}")
        elif args.paths:  # named, so say why nothing came of it
            print(f"{path}: no plot for it (plots {', '.join(f'{k}*.json' for k in PLOTS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
