"""What every entry point shares: arguments, config + data checks before any work, the output folder.

Every user mistake (config, data, output folder) ends here as one line on stderr
and exit status 2, before the output folder is created.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import sys

import yaml

from . import storage
from .config import Config, ConfigError, describe
from .data_source import Cifar10, DataError, default_cache_dir, load_cifar10, resolve_data_dir
from .validation import check_against_data, check_resources, config_from_dict, load_config


class UsageError(Exception):
    pass


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="study YAML overriding the defaults (see --help-config)")
    parser.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                        help="override one field, e.g. --set train.epochs=5 (repeatable; value read as YAML)")
    parser.add_argument("--data", metavar="DIR",
                        help="CIFAR-10 folder: train/test.parquet or cifar-10-batches-py (default: $RAY_CIFAR_DATA)")
    parser.add_argument("--output", metavar="DIR", help="results folder (default: results/<name>-<time>); must not exist")
    parser.add_argument("--smoke-test", action="store_true",
                        help="shrink the study to a tiny ResNet, a few thousand images and a few epochs (CPU-sized)")
    parser.add_argument("--budget-scale", type=float, default=1.0, metavar="X",
                        help="multiply every training length (epochs, max_steps, schedule epochs/iterations, ASHA "
                             "epochs), fixed or searched, by X: 0.1 runs a study at a tenth of its published length "
                             "(default: 1)")
    parser.add_argument("--help-config", action="store_true", help="list every config field with default and unit")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written. Defaults are said in each option's own text, where they mean
    something: ArgumentDefaultsHelpFormatter appended "(default: None)" after texts that already said it."""


def parse_args(prog: str, description: str, argv: list[str] | None, resume: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=Formatter)
    add_common_arguments(parser)
    if resume:
        parser.add_argument("--resume", metavar="OUTPUT",
                            help="continue the study in OUTPUT whose driver died or was stopped (other options are "
                                 "ignored: the study's own config.yaml is used)")
        parser.add_argument("--resume-if-exists", action="store_true",
                            help="start the study, or, when --output already holds one (a retried job, e.g. a KubeRay "
                                 "RayJob), continue it as --resume OUTPUT does")
    return parser.parse_args(argv)


def local_output(output: str, cache_dir: str | None) -> str:
    """Where this driver writes a study's files: the folder of a path or file:// URI, else (s3://, gs://)
    a local mirror that the study copies up to the URI as it goes (Ray writes its checkpoints there
    directly)."""
    path = storage.local_path(output)
    if path is not None:
        return path
    digest = hashlib.sha256(output.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(cache_dir or default_cache_dir()), "outputs", digest)


def output_uri(output: str | None) -> str | None:
    """The --output a study copies its files up to, when it is remote storage (s3://, gs://)."""
    return output if output and storage.local_path(output) is None else None


def load_resolved_config(output: str) -> Config:
    """The config a study in `output` was started with (its config.yaml); exit 2 when it does not load."""
    try:
        with open(os.path.join(output, "config.yaml")) as f:
            return config_from_dict(yaml.safe_load(f))
    except (OSError, ConfigError, yaml.YAMLError) as e:
        fail(f"{output}/config.yaml: {e}")


def fail(message: str) -> None:
    print(f"ray_cifar: error: {message}", file=sys.stderr)
    sys.exit(2)


def default_output(kind: str, config_path: str | None) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "default"
    return os.path.join("results", f"{kind}-{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def local_resources() -> tuple[float, float]:
    """This machine's real cores (those this process may run on) and CUDA GPUs."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return float(cpus), float(torch.cuda.device_count())


def check_before_trials(cfg: Config, num_train_images: int, searched: bool) -> None:
    """The mistakes only the data or the machine reveal, for every trial (`searched`: the search space's too)."""
    check_against_data(cfg, num_train_images, searched)
    if not (cfg.tune.address or os.environ.get("RAY_ADDRESS")):
        # A local Ray, or one process: the ranks must fit this machine's real cores and GPUs. (A trial's driver
        # only watches its ranks; init_ray declares logical CPUs for it, so it is not counted here. On a running
        # cluster the study checks against the cluster's resources, driver included, once Ray is up.)
        check_resources(cfg, *local_resources(), count_driver=False, searched=searched)


def prepare(args: argparse.Namespace, kind: str) -> tuple[Config, Cifar10, str]:
    """Resolve and check everything (config, data, output folder) before any work; exit 2 on a mistake."""
    if args.help_config:
        print(describe())
        sys.exit(0)
    try:
        cfg = load_config(args.config, args.sets, smoke_test=args.smoke_test, budget_scale=args.budget_scale)
        if args.data:
            cfg.data.path = args.data
        data_dir = resolve_data_dir(cfg.data.path)
        if data_dir is not None and not storage.is_uri(data_dir):
            # Workers on every node read the same absolute path; record it in the resolved config.
            cfg.data.path = os.path.abspath(os.path.expanduser(data_dir))
        dataset = load_cifar10(cfg.data.path, cfg.data.cache_dir)
        output = local_output(args.output or default_output(kind, args.config), cfg.data.cache_dir)
        if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)) or (
                storage.local_path(args.output or "") is None and not storage.is_empty(args.output)):
            raise UsageError(f"output folder {args.output or output} already exists and is not empty: "
                             f"choose a new --output")
        check_before_trials(cfg, len(dataset.train_labels), searched=kind == "tune")
    except (ConfigError, DataError, UsageError, storage.StorageError) as e:
        fail(str(e))
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return cfg, dataset, output


def refusing_up_front(output: str | None, run) -> int:
    """Run a study; a ConfigError raised before any trial started (e.g. a trial larger than the cluster,
    seen only once Ray is up) is one line and exit 2, and the new output folder is removed again."""
    try:
        return run()
    except (ConfigError, storage.StorageError) as e:
        if output is not None and set(os.listdir(output)) <= {"config.yaml", "driver.json"}:
            shutil.rmtree(output)
        fail(str(e))
    return 2
