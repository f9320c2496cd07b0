"""What every entry point shares: arguments, config + data checks before any work, the output folder.

Every user mistake (config, data, output folder) ends here as one line on stderr
and exit status 2, before the output folder is created.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import errno
import hashlib
import math
import os
import re
import shutil
import signal
import sys
import threading
from typing import Callable, NoReturn

import yaml

from . import console, storage
from .config import (RESOLVED_BEGIN, RESOLVED_END, SMOKE_OVERRIDES, Config, ConfigError, cut_short, describe, flatten,
                     load_yaml, parse_set, partly_searched, search_keys, yaml_problem)
from .data.source import Cifar10, DataError, default_cache_dir, load_cifar10, resolve_data_dir
from .validation import (check_against_data, check_resources, config_from_dict, lengths_past_the_run, load_config,
                         local_resources, name_the_set)


class UsageError(Exception):
    pass


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="study YAML overriding the defaults (see --help-config)")
    parser.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                        help="override one field, e.g. --set train.epochs=5 (repeatable; value read as YAML)")
    parser.add_argument("--data", metavar="DIR",
                        help="CIFAR-10 folder or s3:// gs:// URI: train/test.parquet or cifar-10-batches-py "
                             "(default: the config's data.path, else $RAY_CIFAR_DATA, else torchvision downloads it "
                             "into the cache folder)")
    parser.add_argument("--output", metavar="DIR", help="results folder (default: results/<name>-<time>); must not exist")
    parser.add_argument("--smoke-test", action="store_true",
                        help="shrink the run to a tiny ResNet, a few thousand images and a few epochs (CPU-sized): "
                             "the schedule's lengths keep their share of the run, batch sizes at most 256 (in a study "
                             "also two values of each searched list, ASHA's grace 1 and reduction 2); it prints what "
                             "it changed")
    parser.add_argument("--budget-scale", type=float, default=1.0, metavar="X",
                        help="multiply every training length (epochs, max_steps, schedule epochs/iterations, ASHA "
                             "epochs), fixed or searched, by X: 0.1 runs a study at a tenth of its published length "
                             "(default: 1)")
    parser.add_argument("--help-config", action="store_true", help="list every config field with default and unit")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written. Defaults are said in each option's own text, where they mean
    something: ArgumentDefaultsHelpFormatter appended "(default: None)" after texts that already said it."""


RESUMES = {"study": "the study in OUTPUT whose driver died or was stopped",
           "run": "the one-process run in OUTPUT from its latest checkpoint"}


def parse_args(prog: str, description: str, argv: list[str] | None, resume: str | None = None) -> argparse.Namespace:
    """RESUME: what --resume continues, a "study" (with --resume-if-exists) or a one-process "run"; None: no --resume."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=Formatter)
    add_common_arguments(parser)
    if resume:
        parser.add_argument("--resume", metavar="OUTPUT",
                            help=f"continue {RESUMES[resume]} (other options are ignored: its own config.yaml is "
                                 f"used)")
    if resume == "study":
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
    """The config a study in `output` was started with (its config.yaml); exit 2 (one line) when it does not load."""
    path = os.path.join(output, "config.yaml")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        resolved = load_yaml(text)
        if not isinstance(resolved, dict):
            raise ConfigError(f"expected a mapping of sections, got {type(resolved).__name__}")
        why = cut_short(resolved, text)
        if why:
            raise ConfigError(why)
        return config_from_dict(resolved)
    except OSError as e:
        fail(f"{path}: cannot read it ({e.strerror or e})")
    except (ConfigError, yaml.YAMLError, ValueError) as e:  # ValueError: not UTF-8
        fail(f"{path} is damaged ({yaml_problem(e)}); it is the study's resolved config: restore it from a backup, "
             f"or write it again from the command that started the study with --output elsewhere")


def fail(message: str, status: int = 2) -> None:
    print(f"ray_cifar: error: {message}", file=sys.stderr)
    sys.exit(status)


def warn_sets_searched(cfg: Config, sets: list[str]) -> None:
    """A --set of a field the study searches is replaced by each trial's sampled value: say so, one line
    each, before anything runs (a warning, not a refusal: the value is still the fixed default the config
    file records, and a study file plus a quick --set must stay usable; the user sees it and can Ctrl-C).
    Where only some values of a grid set it (variants of which a few set their own train.epochs), the --set
    reaches the other trials: the line says how many values set their own."""
    searched, partly = search_keys(cfg.tune.search_space), partly_searched(cfg.tune.search_space)
    for assignment in sets:
        key = parse_set(assignment)[0]
        hit = [k for k in searched if k == key or k.startswith(key + ".")]
        if not hit or key.startswith("tune.search_space"):
            continue
        overridden = [k for k in hit if k not in partly]
        if not overridden:  # (a variant that sets its own train.epochs, the others not)
            n, values = partly[hit[0]]
            print(f"[ray_cifar] warning: --set {assignment} reaches only some trials: {n} of the {values} values "
                  f"the study searches set {hit[0]} themselves (tune.search_space overrides it in those)",
                  flush=True)
            continue
        print(f"[ray_cifar] warning: --set {assignment} has no effect: the study searches {overridden[0]} "
              f"(tune.search_space overrides it); change the search instead (e.g. {overridden[0]}: {{grid: [...]}} "
              f"under tune.search_space in the study file), or drop it with --set tune.search_space={{}}",
              flush=True)


def create_output(output: str) -> None:
    """The output folder, created now (before any work): one line and exit 2 when it cannot be."""
    try:
        os.makedirs(output, exist_ok=True)
        probe = os.path.join(output, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the disk is full"
        elif e.errno == errno.EROFS:
            reason = "it is on a read-only file system"
        elif e.errno in (errno.ENOTDIR, errno.EEXIST):
            reason = "a file is in the way"
        else:
            reason = e.strerror or str(e)
        fail(f"--output {output}: cannot create it ({reason}: {e.filename or output})")


def default_output(kind: str, config_path: str | None) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "default"
    return os.path.join("results", f"{kind}-{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def check_before_trials(cfg: Config, num_train_images: int, searched: bool) -> None:
    """The mistakes only the data or the machine reveal, for every trial (`searched`: the search space's too)."""
    check_against_data(cfg, num_train_images, searched)
    left = num_train_images - cfg.data.val_count(num_train_images)
    if cfg.data.train_subset is not None and cfg.data.train_subset > left:
        print(f"[ray_cifar] warning: data.train_subset={cfg.data.train_subset} is more than the {left} train images "
              f"left after validation: every one of them is used", flush=True)
    for line in lengths_past_the_run(cfg, num_train_images, searched):
        print(f"[ray_cifar] warning: {line}", flush=True)
    if not cfg.tune.cluster_address():
        # A local Ray, or one process: the ranks must fit this machine's real cores and GPUs. (A trial's driver
        # only watches its ranks; init_ray declares logical CPUs for it, so it is not counted here. On a running
        # cluster the study checks against the cluster's resources, driver included, once Ray is up.)
        check_resources(cfg, *local_resources(), count_driver=False, searched=searched)


def smoke_preset_note(message: str, args: argparse.Namespace) -> str:
    """Where a refusal names a field --smoke-test's preset set (and no --set did), that the preset set it: the user
    wrote neither the value nor the field (a smoke test of a data folder smaller than CIFAR-10's was refused with
    data.val_size 2000 and no word of where it came from)."""
    if not getattr(args, "smoke_test", False):
        return ""
    preset = flatten(SMOKE_OVERRIDES)
    named = {parse_set(s)[0] for s in args.sets or []}
    # The refused field ("train.epochs: ..."), or a bound another field put on it ("tune.max_epochs: must be in
    # [1, train.epochs=6]": the --set was the user's, the 6 the preset's).
    key = next((k for k in preset if k not in named
                and re.search(rf"(^|: ){re.escape(k)}: |(?<![\w.]){re.escape(k)}=", message)), None)
    if key is None:
        return ""
    return f"; --smoke-test sets {key}={preset[key]!r}, sized for CIFAR-10's 50,000 train images: add --set {key}=..."


def smoke_changes(args: argparse.Namespace, cfg: Config) -> str | None:
    """--smoke-test's changes to the study, in a line: each field it set (from -> to) and the trials the search
    space gives. A smoke run of an ASHA study ran at grace 1, reduction 2 and batch 128 with no word of it, its
    study file's header ("keep the best third", "batch 64") read as if it held for the smoke run."""
    if not args.smoke_test:
        return None
    named: set[str] = set()  # fields a --set gave: the user's, not the preset's
    try:
        study = load_config(args.config, args.sets, budget_scale=args.budget_scale)
    except ConfigError:
        # Valid only shrunk (a --set that fits the smoke run alone: tune.max_epochs=2 under grace 5): the line was
        # left out. Against the study file without the --sets, their fields left out.
        try:
            study = load_config(args.config, [], budget_scale=args.budget_scale)
        except ConfigError:
            return None  # the study file itself is valid only shrunk: the preset is all there is to say
        named = {parse_set(assignment)[0] for assignment in args.sets}
    before, after = flatten(study.to_dict()), flatten(cfg.to_dict())
    after = {k: v for k, v in after.items() if not any(k == n or k.startswith(n + ".") for n in named)}
    # With train.max_steps the steps set the length, not train.epochs ("train.epochs 30 -> 6" read as the length).
    unused = {"train.epochs": "not the length: train.max_steps is"} if cfg.train.max_steps is not None else {}
    changed = [f"{k} {before.get(k)!r} -> {v!r}" + (f" ({unused[k]})" if k in unused else "")
               for k, v in after.items() if k != "tune.search_space" and before.get(k) != v]
    if study.tune.search_space != cfg.tune.search_space and "tune.search_space" not in named:
        changed.append(_space_cut(study.tune.search_space, cfg.tune.search_space))
        rescaled = _rescaled(study.tune.search_space, cfg.tune.search_space)
        if rescaled:
            changed.append(f"and not only cut: the preset changed the values of {', '.join(rescaled)} too")
    return "--smoke-test changed " + ", ".join(changed) if changed else None


def _space_cut(own: dict, smoke: dict) -> str:
    """How far the preset cut the search space: its grid and choice lists' combinations. A range is not cut, and
    its two ends are not points: BOHB's space of one loguniform and three 4-value choices read "cut to 16 of its
    128 point(s)"."""
    def combinations(space: dict) -> int:
        return math.prod(len(values) for kind, values in map(_entry, space.values()) if kind in ("grid", "choice"))

    ranges = [k for k, spec in own.items() if _entry(spec)[0] not in ("grid", "choice")]
    if not ranges:
        return f"the search space cut to {combinations(smoke)} of its {combinations(own)} point(s)"
    return (f"the search space's lists cut to {combinations(smoke)} of their {combinations(own)} combination(s) "
            f"(its range of {', '.join(ranges)} not cut)")


def _entry(spec: dict) -> tuple[str, list]:
    """A validated search-space entry, {kind: values}, as (kind, values) (a range's values: its two ends)."""
    return next(iter(spec.items()))


def _rescaled(own: dict, smoke: dict) -> list[str]:
    """The search-space keys whose smoke values are not among the study's own (lengths scaled, batch sizes capped,
    the smoke model in each variant, ranges moved): "cut to 2 of its 12 points" alone read as the study's own
    values, fewer of them. Inside variants (or a section's values) the fields changed are named: "the values of
    variants" left the user to find which."""
    found = []
    for key, spec in smoke.items():
        if key not in own:
            continue
        (kind, values), (own_kind, own_values) = _entry(spec), _entry(own[key])
        if kind == own_kind and all(v in own_values for v in values):
            continue
        inner = [v for v in values if isinstance(v, dict)]
        if inner and kind == own_kind:
            theirs = [v for v in own_values if isinstance(v, dict)]
            fields = dict.fromkeys(f for v in inner for f, x in flatten(v).items()
                                   if all(flatten(t).get(f) != x for t in theirs))
            if fields:
                found.append(f"{', '.join(fields)} in {key}")
                continue
        found.append(key)
    return found


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
        if kind == "tune":
            warn_sets_searched(cfg, args.sets)
        check_before_trials(cfg, len(dataset.train_labels), searched=kind == "tune")
        changes = smoke_changes(args, cfg)
        if changes:
            print(f"[ray_cifar] {changes}", flush=True)
    except ConfigError as e:
        fail(name_the_set(str(e), args.sets) + smoke_preset_note(str(e), args))
    except (DataError, UsageError, storage.StorageError) as e:
        fail(str(e))
    create_output(output)
    write_config(cfg, output)
    return cfg, dataset, output


def write_config(cfg: Config, output: str) -> None:
    """OUTPUT/config.yaml: the resolved config, as run."""
    try:
        with open(os.path.join(output, "config.yaml"), "w") as f:
            f.write(RESOLVED_BEGIN + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + RESOLVED_END)
    except OSError as e:
        fail(f"--output {output}: cannot write config.yaml ({e.strerror or e})", status=1)


def refusing_up_front(output: str | None, run, resume_command: str | None = None) -> int:
    """Run a study; a ConfigError raised before any trial started (e.g. a trial larger than the cluster,
    seen only once Ray is up) is one line and exit 2, and the new output folder is removed again.
    A full disk is one line and exit 1 (the study stays resumable); a Ctrl-C or SIGTERM that reaches here exits 130,
    with RESUME_COMMAND: one while no trial runs (Ray starting, say: Tune's own handler stops running trials
    gracefully), or a second one, which stops running trials at once (it said "stopped while no trial ran", of two
    trials with epochs recorded)."""
    try:
        with sigterm_as_ctrl_c():
            return run()
    except (ConfigError, storage.StorageError) as e:
        if output is not None and set(os.listdir(output)) <= {"config.yaml", "driver.json", "study-start.json",
                                                                console.LOGS}:
            shutil.rmtree(output)
        fail(str(e))
    except storage.DiskFull as e:
        fail(str(e), status=1)
    except KeyboardInterrupt:
        if resume_command:
            print(f"\n[ray_cifar] stopped; every epoch recorded so far is kept (one a trial was in is trained "
                  f"again). Continue it with:\n  {resume_command}", flush=True)
        else:
            print("\n[ray_cifar] stopped before the study started", file=sys.stderr, flush=True)
        return 130
    return 2


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Inside: SIGTERM (what `kill`, Slurm, Kubernetes and spot instances send first) raises KeyboardInterrupt, so
    the caller's Ctrl-C clause ends it with its line saying what was kept; the previous handler comes back after."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def hangup_as_sigterm() -> None:
    """A terminal that hangs up (an ssh session dropped, a window closed) sends SIGHUP, whose default ended a study's
    driver at once: no --resume line, nothing of the study saved since Tune's last save, Ray's agents left running
    for a minute (measured). It is taken as SIGTERM, the polite stop every entry point has (a study saved and
    resumable, its line saying how to go on: in OUTPUT/logs, the screen being gone). Where SIGHUP is ignored
    (nohup) or has a handler, it is left so."""
    if not hasattr(signal, "SIGHUP") or signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL:
        return

    def hangup(signum, frame):
        print("\n[ray_cifar] the terminal hung up (SIGHUP): stopping as on SIGTERM. A run that outlives its terminal "
              "starts in tmux or screen, or with nohup", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGHUP, hangup)


def exit_after(main: Callable[[], int | None]) -> NoReturn:
    """Run an entry point's `main` and end the process as a normal exit does, less Python's teardown of its
    modules: 3-4 s of CPU after a study (torch, Ray, pyarrow and matplotlib loaded) that every command ran
    before its prompt came back. What a normal exit does that matters still happens, in its order: the
    non-daemon threads are waited for, every atexit hook runs (ray.shutdown, logging, tensorboardX, pyarrow's
    S3), stdout and stderr are flushed; the exit status is the same. An exception other than SystemExit takes
    the normal way out (its traceback). A hang-up stops it as SIGTERM does (hangup_as_sigterm). A Ctrl-C that
    reaches here (in the first seconds, while torch and Ray are imported and the config checked: no handler of
    the program's own is in yet) is one line and exit 130, not 40 lines of traceback and exit 1."""
    hangup_as_sigterm()
    try:
        status = main()
    except SystemExit as e:
        status = e.code
    except KeyboardInterrupt:
        print("\n[ray_cifar] stopped (Ctrl-C) while starting", file=sys.stderr, flush=True)
        status = 130
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)  # what SystemExit("message") prints
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status or 0)
