"""The GPU check's figures as Markdown, for README "GPU figures": what a lend returned, as it returned it.

    python benchmarks/gpu_figures.py                      # benchmarks/results/gpu_{core,ray,dali,ray_dali}.json
    python benchmarks/gpu_figures.py DIR                  # DIR/gpu_{core,ray,dali,ray_dali}.json

One section a stage whose JSON is there (device named, versions, commit, status against its cap), a line a
part (its status, seconds against its estimate, its summary), then each part's figures as a table: every
ratio comes from one run on one device, as gpu_check.py measured it. A stage cut by its cap, a failed part, a
missing stage or figure says so in its place: a partial lend is written up as it is. A dry run's JSON is
marked as CPU figures. Reads JSON only (no torch, no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

STAGES = ("core", "ray", "dali", "ray_dali")
BEYOND_THE_PLAN = {"ray_dali": "beyond a lend's plan of 12 minutes: its sixth call, where time is left"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table; None cells print as '-'."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in cells]


def num(value, digits: int = 0, suffix: str = "") -> str | None:
    """A figure rounded for the page (thousands grouped); None stays None."""
    return None if value is None else f"{value:,.{digits}f}{suffix}"


def sig(value) -> str | None:
    """Three significant digits (a dry run's CPU measures ~0.2 TFLOP/s, a GPU ~800)."""
    return None if value is None else f"{value:.3g}"


def pct(fraction) -> str | None:
    return None if fraction is None else f"{100 * fraction:.1f}%"


def stage_header(doc: dict) -> list[str]:
    versions = ", ".join(f"{name} {doc[key]}" for name, key in (("torch", "torch"), ("CUDA", "cuda"), ("Ray", "ray"),
                                                                   ("DALI", "dali")) if doc.get(key))
    lines = [f"### {doc['stage']}: {doc.get('device', '?')}", ""]
    if doc.get("dry_run"):
        lines += ["**DRY RUN: CPU-sized figures from a machine without a GPU, not GPU figures.**", ""]
    gpu = f", {doc['gpu_memory_gib']} GiB" if doc.get("gpu_memory_gib") else ""
    gpu += "".join(f", {what} {doc[key]}" for what, key in (("driver", "driver"), ("compute mode", "compute_mode"))
                   if doc.get(key))
    lines += [f"{doc.get('time', '?')[:16].replace('T', ' ')} UTC, commit {str(doc.get('git_sha') or '?')[:7]}; "
              f"{versions}{gpu}. Stage {doc.get('status', '?')}: {num(doc.get('seconds'))} s of its "
              f"{num(doc.get('cap_seconds'))} s cap.", ""]
    rows = [[p["name"], p["status"], f"{num(p.get('seconds')) or '-'} ({num(p.get('estimate_seconds'))})",
             "; ".join(x for x in (p.get("summary"), p.get("error")) if x) or p.get("what")] for p in doc["parts"]]
    return lines + table(["part", "status", "s (estimate)", "figure"], rows) + [""]


def train_step(f: dict) -> list[str]:
    rows = [[v["variant"], num(v.get("images_per_second")), num(v.get("vs_plain_pytorch"), 2, "x"),
             pct(v.get("mfu_of_measured_peak")), pct(v.get("mfu")), num(v.get("warmup_seconds"), 1)]
            for v in f.get("variants", [])]
    lines = [f"Training step, {f.get('model')} at batch {f.get('batch_size')} (median of {f.get('repeats')} rounds of "
             f"{f.get('steps_per_measurement')} steps; compile backend {f.get('compile_backend')}); MFU against the "
             f"measured bf16 matmul rate, {sig(f.get('measured_bf16_matmul_tflops'))} TFLOP/s (datasheet "
             f"{sig(f.get('datasheet_bf16_tflops')) or 'unknown'}):", ""]
    lines += table(["variant", "img/s", "vs plain PyTorch", "MFU", "MFU (datasheet)", "warm-up s"], rows)
    for what, key in (("Failed", "failed_variants"), ("Not measured", "cut_variants")):
        if f.get(key):
            lines += ["", f"{what}: " + "; ".join(f"{k}: {v}" for k, v in f[key].items())]
    return lines


def seed000(f: dict) -> list[str]:
    rows = [[r["lr"], num(r.get("test_acc"), 2), r.get("published_test_acc"), num(r.get("vs_published"), 2),
             num(r.get("best_val_acc"), 2), r.get("epochs_done"), num(r.get("median_images_per_second")),
             num(r.get("wall_seconds"))] for r in f.get("runs", [])]
    sized = f"; sized down: {' '.join(f['overrides'])}" if f.get("overrides") else ""
    return ([f"Seed study 000's first table ({f.get('study')}: ResNet-18, SGD, constant lr, 15 epochs, batch 128; "
             f"{f.get('runs_at_once')} runs at once on the device{sized}). {f.get('note', '')}:", ""]
            + table(["lr", "test acc %", "published %", "difference", "best val %", "epochs", "img/s", "wall s"], rows))


def failures(f: dict) -> list[str]:
    """A line for each loader that failed (the loaders' and fed_epoch's `errors`)."""
    return [f"- FAILED {e['path']} ({e['set']}): {e['error']}" for e in f.get("errors", [])]


def loaders(f: dict) -> list[str]:
    by: dict[str, dict[str, dict]] = {}
    for r in f.get("results", []):
        by.setdefault(r["set"], {})[r["path"]] = r
    paths = sorted({p for s in by.values() for p in s}, key=lambda p: (not p.startswith("torchvision"), p))
    rows = [[s, *[(f"{num(r[p]['images_per_second'])} ({num(r[p].get('build_seconds'), 2)} s)" if p in r else None)
                  for p in paths]] for s, r in by.items()]
    lines = [f"Augmented batches delivered on the device, img/s (build s), batch {f.get('batch_size')}, "
             f"{f.get('dataloader_workers')} DataLoader workers:", ""] + table(["set", *paths], rows)
    lines += [""] + [f"- {k}: {v}x" for k, v in f.get("ratios", {}).items()]
    return lines + failures(f)


def fed_epoch(f: dict) -> list[str]:
    rows = [[r["set"], r["path"].removeprefix("resnet18-"), num(r.get("images_per_second")),
             num(r.get("fraction_of_resident"), 3)] for r in f.get("results", [])]
    lines = [f"One epoch of {num(f.get('images_per_epoch'))} images, {f.get('model')}, batch {f.get('batch_size')}: "
             "each loader against batches already in GPU memory:", ""]
    lines += table(["set", "fed", "img/s", "of from-memory"], rows)
    return lines + failures(f)


def studies(parts: dict) -> list[str]:
    rows = [[name, f.get("trials"), f.get("trials_at_once", 1), num(f.get("wall_seconds")), f.get("trial_epochs"),
             num(f.get("study_images_per_second")), num(f.get("median_epoch_images_per_second")),
             pct(f.get("study_vs_epoch_images_per_second")), num(f.get("median_startup_seconds"), 1),
             num(f.get("best_trial_test_acc"), 2)]
            for name, f in parts.items() if name in ("asha", "packed") and f]
    if not rows:
        return []
    lines = ["The ASHA study one trial at a time (asha) and several to the GPU (packed): img/s over the whole study "
             "against an epoch's own:", ""]
    lines += table(["study", "trials", "at once", "wall s", "trial-epochs", "study img/s", "epoch img/s",
                    "study / epoch", "startup s", "best test acc %"], rows)
    packed = parts.get("packed") or {}
    if packed.get("packing_speedup"):
        lines += ["", f"- packed / one at a time (same run): {packed['packing_speedup']}x the study img/s; wall time "
                      f"one at a time / packed {packed.get('wall_ratio')}x"]
    return lines


def kill_resume(f: dict) -> list[str]:
    return [f"Killed and resumed: SIGKILL after epoch {f.get('killed_after_epoch')}, resumed from epoch "
            f"{f.get('resumed_from_epoch')}; epochs recorded {f.get('epochs')}; trial {f.get('trial_status')}; "
            f"train loss {f.get('train_loss')}; test acc {num(f.get('test_acc'), 2)}%; {num(f.get('wall_seconds'))} s."]


def dali_study(f: dict) -> list[str]:
    rows = [[name, p.get("fed_by"), p.get("epochs"), num(p.get("last_epoch_images_per_second")),
             num(100 * p["val_acc"] if p.get("val_acc") is not None else None, 2)]
            for name, p in f.get("pipelines", {}).items()]
    lines = [f"One study, two one-rank trials one at a time, the same but for data.pipeline "
             f"({num(f.get('wall_seconds'))} s; best trial's test acc {num(f.get('best_trial_test_acc'), 2)}%):", ""]
    lines += table(["data.pipeline", "fed by", "epochs", "last epoch img/s", "val acc %"], rows)
    if f.get("dali_vs_torch_epoch_images_per_second"):
        lines += ["", f"- dali / torch (same study): {f['dali_vs_torch_epoch_images_per_second']}x an epoch's img/s"]
    return lines


RENDER = {"train_step": train_step, "seed000": seed000, "augment": loaders, "loaders": loaders,
          "fed_epoch": fed_epoch, "kill_resume": kill_resume, "dali_study": dali_study}


def stage_figures(doc: dict) -> list[str]:
    lines = stage_header(doc)
    parts = {p["name"]: p.get("figures") or {} for p in doc["parts"]}
    for part in doc["parts"]:
        if part["name"] == "asha":  # asha and packed side by side, in one table
            block = studies(parts)
        elif part["name"] in RENDER and part.get("figures"):
            block = RENDER[part["name"]](part["figures"])
        else:
            continue
        lines += block + [""] if block else []
    return lines


def render(results: str) -> str:
    lines: list[str] = []
    for stage in STAGES:
        path = os.path.join(results, f"gpu_{stage}.json")
        if not os.path.exists(path):
            why = f"; {BEYOND_THE_PLAN[stage]}" if stage in BEYOND_THE_PLAN else ""
            lines += [f"### {stage}: not run (no gpu_{stage}.json{why})", ""]
            continue
        with open(path) as f:
            lines += stage_figures(json.load(f))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=RESULTS, help="folder of gpu_<stage>.json (benchmarks/results)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results):
        parser.error(f"no folder {args.results}")
    sys.stdout.write(render(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
