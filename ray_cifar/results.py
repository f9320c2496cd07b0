"""Results are data: Parquet rows that reports, tables and plots are made from.

results.parquet  one row per trial per epoch: trial_id, epoch, each searched field as
                 its own column ("optim.name", ...), the epoch's metrics and timings.
trials.parquet   one row per trial: status (completed / stopped / failed), epochs run,
                 best val_acc, and test_acc for the study's best trial only.
Both carry the provenance columns of `provenance()`. Files are replaced atomically,
so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

EPOCH_METRICS = ("steps", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "eval_seconds",
                 "images_per_second", "num_workers", "train_images", "data_pipeline", "amp", "device", "nodes",
                 "diverged", "resumed_from_epoch", "startup_seconds", "checkpoint_path")


def git_sha() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    import torch

    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"git_sha": git_sha(), "torch_version": torch.__version__, "ray_version": ray_version,
            "python_version": platform.python_version(), "host_gpu": gpu}


def epoch_row(trial_id: str, params: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    row = {"trial_id": trial_id, "epoch": int(metrics["epoch"])}
    row.update(params)
    row.update({k: metrics.get(k) for k in EPOCH_METRICS})
    row.update(extra)
    return row


def _column_safe(value: Any) -> Any:
    # Lists (e.g. model.blocks) and dicts go in as JSON text so every column has one type.
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def write_rows(rows: Iterable[dict[str, Any]], path: str) -> None:
    rows = [{k: _column_safe(v) for k, v in r.items()} for r in rows]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    # from_pylist takes its columns from the first row: give every row every column.
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]) if rows else pa.table({})
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


class ResultsLog:
    """OUTPUT/results.parquet, grown by one small part file per append (never a rewrite of all rows).

    `read()` merges the compacted file and the parts, keeping one row per (trial_id, epoch);
    `compact()` folds the parts into results.parquet (at the end of a study)."""

    def __init__(self, output: str):
        self.path = os.path.join(output, "results.parquet")
        self.parts = os.path.join(output, "results.parts")

    def _part_files(self) -> list[str]:
        if not os.path.isdir(self.parts):
            return []
        return sorted(os.path.join(self.parts, f) for f in os.listdir(self.parts) if f.endswith(".parquet"))

    def append(self, rows: list[dict[str, Any]]) -> None:
        os.makedirs(self.parts, exist_ok=True)
        existing = self._part_files()
        number = int(os.path.basename(existing[-1])[5:11]) + 1 if existing else 0
        write_rows(rows, os.path.join(self.parts, f"part-{number:06d}.parquet"))

    def read(self) -> list[dict[str, Any]]:
        rows: dict[tuple, dict[str, Any]] = {}
        for path in ([self.path] if os.path.exists(self.path) else []) + self._part_files():
            for row in pq.read_table(path).to_pylist():
                rows[(row["trial_id"], row["epoch"])] = row
        return list(rows.values())

    def compact(self) -> str:
        write_rows(self.read(), self.path)
        for path in self._part_files():
            os.remove(path)
        return self.path
