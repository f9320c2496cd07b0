"""Run a study: Ray Tune + ASHA over DDP trials of CIFAR-10 ResNets.

    python -m ray_cifar.tune                                   # the default study (optimizers x batch sizes)
    python -m ray_cifar.tune --smoke-test --data ../shared/data/cifar10 --output out/smoke
    python -m ray_cifar.tune --config studies/adam_batch_lr_grid.yaml --set train.epochs=10
    python -m ray_cifar.tune --resume out/smoke                # continue a study whose driver died
    python -m ray_cifar.tune --config ... --output s3://B/x --resume-if-exists   # a retried job: start or continue
    RAY_ADDRESS=auto python -m ray_cifar.tune --config ...     # on a node of a running Ray cluster

Writes OUTPUT/config.yaml (resolved), OUTPUT/results.parquet (a row per trial per
epoch), OUTPUT/trials.parquet (a row per trial), OUTPUT/tensorboard/, Ray's own
files (checkpoints included) under OUTPUT/ray, and what the driver printed under
OUTPUT/logs. The test split is evaluated once, for the best trial by tune.metric/tune.mode,
at the end (--set tune.test=all: every finished trial, each at its best validation epoch).
The first Ctrl-C (or SIGTERM) stops the study gracefully and prints the --resume command
(exit 130; a second one stops at once); a full disk stops it the same way with one line
(exit 1); exit status 1 when any trial failed.
"""

from __future__ import annotations

import os

from . import cli
from .console import Held, holding, logged_to

COMMAND = "python -m ray_cifar.tune"


def resume(location: str, argv: list[str] | None, held: Held, found: str | None = None) -> int:
    """--resume LOCATION; `found` (a line) is printed once LOCATION proves to hold a study (--resume-if-exists)."""
    from . import storage
    from .results import is_train_output
    from .tuning import study

    remote = cli.output_uri(location)
    output = cli.local_output(location, None)
    if remote and not os.path.isdir(output):
        # A new head (the old one was lost): the study's files come back from the output URI.
        storage.sync_down(remote, output)
    started = os.path.isdir(output) and study.can_resume(output, remote)
    if not started and not (os.path.isdir(output) and study.never_started(output)):
        option = "--resume-if-exists --output" if found else "--resume"  # (as the user gave it)
        if not remote and not os.path.exists(output):
            cli.fail(f"{option} {location}: no such folder")
        if not os.path.isfile(os.path.join(output, "config.yaml")):
            what = "no config.yaml and no Tune experiment in ray/tune"
        elif is_train_output(output):
            what = "no Tune experiment in ray/tune: a `python -m ray_cifar.train` run's output (checkpoints/, no study)"
        else:
            what = "no Tune experiment in ray/tune"
        cli.fail(f"{option} {location}: not a ray_cifar study output ({what})"
                 + (f"; its copy on this machine is {output}" if remote else ""))
    if found:
        print(found, flush=True)
    cfg = cli.load_resolved_config(output)
    if study.is_finished(output):
        if not study.repair_finished(cfg, output):
            print(f"[ray_cifar] the study in {output} has already finished: see {output}/trials.parquet")
        return 0
    with logged_to(output, COMMAND, argv, held):
        if not started:  # its driver was stopped in its first seconds (a retried job's first try, say)
            print(f"[ray_cifar] the study in {location} was stopped before its first trial (its config.yaml, no Tune "
                  f"experiment or results yet): starting it", flush=True)
        return cli.refusing_up_front(None, lambda: study.run_study(cfg, output, resume=started, remote=remote,
                                                                   shared=storage.is_uri(location)),
                                     f"{COMMAND} --resume {location}")


def holds_study(location: str) -> bool:
    """Whether --output already has something in it (a study a retried job started), for --resume-if-exists."""
    from . import storage

    try:
        return not storage.is_empty(location)
    except storage.StorageError as e:
        cli.fail(str(e))


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(COMMAND, __doc__, argv, resume="study")
    # Ray's import comes first: Ray's logger keeps the stderr it finds, and the log has its own handler for it.
    from .tuning import study  # noqa: F401

    with holding() as held:  # what is printed before the output folder is known begins its log
        return start_or_resume(args, argv, held)


def ignored_by_resume(args) -> list[str]:
    """The options given beside --resume, which it ignores (the study goes on with its own config.yaml)."""
    given = {"--config": args.config, "--set": args.sets, "--data": args.data, "--output": args.output,
             "--smoke-test": args.smoke_test, "--budget-scale": args.budget_scale != 1.0}
    return [name for name, value in given.items() if value]


def start_or_resume(args, argv: list[str] | None, held: Held) -> int:
    if args.resume:
        ignored = ignored_by_resume(args)
        if ignored:  # said, not silent: a user who added --set train.epochs=50 expected a longer study
            print(f"[ray_cifar] --resume ignores {', '.join(ignored)}: the study goes on with its own config.yaml "
                  f"(a changed study is a new one: --config {args.resume}/config.yaml --set ... --output NEW)",
                  flush=True)
        return resume(args.resume, argv, held)
    if args.resume_if_exists:
        if not args.output:
            cli.fail("--resume-if-exists needs --output: the folder or URI a retried run finds its study in")
        if holds_study(args.output):
            return resume(args.output, argv, held, f"[ray_cifar] --resume-if-exists: {args.output} holds a study: "
                                                   f"continuing it (its own config.yaml)")
    from . import storage
    from .tuning import study

    cfg, dataset, output = cli.prepare(args, "tune")
    location = args.output or output
    with logged_to(output, COMMAND, argv, held):
        print(f"[ray_cifar] data: {dataset.source}; resolved config: {output}/config.yaml", flush=True)
        return cli.refusing_up_front(output, lambda: study.run_study(cfg, output, remote=cli.output_uri(location),
                                                                     shared=storage.is_uri(location)),
                                     f"{COMMAND} --resume {location}")


if __name__ == "__main__":
    cli.exit_after(main)
