"""A study's report: figures and tables made only from OUTPUT/config.yaml and its Parquet files.

    python -m ray_cifar.report out/smoke                  # out/smoke/report.html, report.md, figures/*.png
    python -m ray_cifar.report out/sgd out/adam           # one comparison: out/sgd/compare-report.html
    python -m ray_cifar.report out/sgd out/adam --out cmp # ... or cmp/compare-report.html
    python -m ray_cifar.report s3://B/studies/asha-1      # a study in a bucket: ./asha-1-report/report.html

Tables: the trials; per searched point, val_acc over its train.seed replicates with a Student-t 95%
interval and, for the top points, Welch's t-test against the best ("within noise" or "worse"); each run
beside its published figure (the `published:` entries of config.yaml; with tune.test all every
finished trial has a test figure). A PBT or PB2 study has no points (its members' values change, their
weights come from donors): the best trial's schedule, followed back through its donors, stands in place
of the replicates, and the per-field figures and heatmaps are left out. Figures: the trial ranking (by
tune.metric and tune.mode; the test-evaluated trials marked), learning curves, where ASHA stopped each trial
against its rungs, accuracy against each searched field (mean and std over seeds), a heatmap of mean accuracy for each
pair of searched fields, images/s per trial, and the published figures. The HTML references the
PNGs by relative path, so the folder can be moved or copied whole. Runs on a finished output, or on one a killed study left behind.
A comparison ranks every trial by the first output's tune.metric and tune.mode, and adds a
"study" column (each output's folder name) to the searched fields.
"""


from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile

from .. import storage
from ..results import DamagedFile
from .page import write_report
from .study import NotAStudyOutput


def _fetched(output: str, into: str) -> str:
    """A study output as a local folder: a bucket's (s3://, gs://) files copied into `into`/NAME, Ray's own left
    there (checkpoints: the report reads none); a folder as it is."""
    if storage.local_path(output) is not None:
        return output
    local = os.path.join(into, str(len(os.listdir(into))), os.path.basename(output.rstrip("/")))
    storage.sync_down(output, local)
    return local


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_cifar.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", metavar="OUTPUT",
                        help="a study's output folder or s3:// gs:// URI (several: a comparison)")
    parser.add_argument("--out", default=None, help="folder for the report (default: the first OUTPUT; for a URI, "
                                                    "NAME-report in the current folder)")
    args = parser.parse_args(argv)
    first = args.outputs[0]
    out = args.out or (None if storage.local_path(first) is not None else os.path.basename(first.rstrip("/")) + "-report")
    try:
        with tempfile.TemporaryDirectory(prefix="ray_cifar-report-") as fetched:
            path = write_report([_fetched(o, fetched) for o in args.outputs], out, named=args.outputs)
    except (NotAStudyOutput, DamagedFile, storage.StorageError, OSError) as e:  # each names the file or location
        study = shlex.quote(first) if len(args.outputs) == 1 else "OUTPUT"
        remedy = (f"; python -m ray_cifar.tune --resume {study} rebuilds it (the rows from the trials' checkpoints, "
                  f"trials.parquet from trials.json)" if isinstance(e, DamagedFile) else "")
        print(f"ray_cifar.report: error: {e}{remedy}", file=sys.stderr)
        return 2
    print(f"[ray_cifar] report: {path}")
    return 0

