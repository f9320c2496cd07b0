"""A study's report: figures and tables made only from OUTPUT/config.yaml and its Parquet files
(`python -m ray_cifar.report OUTPUT`; cli.py says what it draws).

Layers, each importing only those above it: study (what an output folder holds; several combined), tables
(cells, summaries, replicates, published figures), schedulers (rungs and brackets, in epochs and words),
figures (one PNG each), page (build, report.md and report.html), cli.
"""

from .cli import main
from .figures import FIGURES
from .page import build, write_report
from .study import NotAStudyOutput, Study, combine, load_study, study_max_epochs
from .tables import point_label, summaries

__all__ = ["FIGURES", "NotAStudyOutput", "Study", "build", "combine", "load_study", "main", "point_label",
           "study_max_epochs", "summaries", "write_report"]
