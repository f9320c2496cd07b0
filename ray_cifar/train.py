"""One run of one config through the same loop as a study's trials.

    python -m ray_cifar.train --data ../shared/data/cifar10 --set train.epochs=10
    python -m ray_cifar.train --smoke-test --data ../shared/data/cifar10 --set train.num_workers=1
    python -m ray_cifar.train --config studies/resnet18_lr_schedule_wd.yaml --set train.num_workers=4   # DDP, Ray Train

With train.num_workers == 1 the run is one plain process (no Ray), checkpointed every epoch into
OUTPUT/checkpoints/ (the latest in `latest/`, the best by tune.metric in `best/`), and at its end the best
epoch's weights are evaluated once on the test split (OUTPUT/test.json), as a study does for its best trial.
With more ranks it is a study of one trial (a Ray Train TorchTrainer, no search), with a study's files.
Either way OUTPUT/results.parquet gets one row per epoch through the same route (results.epoch_row ->
results.ResultsLog), and OUTPUT/logs/ what the run printed.
The search space is ignored.
SIGTERM or Ctrl-C stops a one-process run at once (its checkpoints and rows are per epoch; what
was written stays readable); a full disk is one line naming the path, exit 1. Either way, --resume
OUTPUT goes on from its latest checkpoint (a DDP run goes on as the study of one trial it is, with
the study's --resume).

    python -m ray_cifar.train --resume OUTPUT

With train.gpus_per_worker < 1 the process keeps to that share of the GPU's memory, as a packed
trial's rank does, so several runs can share one GPU.
"""

from __future__ import annotations

import os
import uuid

import torch

from . import checkpoint, cli
from .console import holding, logged_to
from .config import Config
from .data.source import Cifar10
from .results import ResultsLog, epoch_row, is_train_output, provenance

COMMAND = "python -m ray_cifar.train"


def run_local(cfg: Config, dataset: Cifar10, output: str, run_id: str, resume: dict | None = None) -> list[dict]:
    from . import engine
    from .data.loader import make_splits
    from .loop import run_training
    from .data.pipelines import train_loader_for

    use_gpu = torch.cuda.is_available() if cfg.train.use_gpu is None else cfg.train.use_gpu
    device = torch.device("cuda" if use_gpu else "cpu")
    # As a packed trial's rank: several one-process runs can share a GPU, each within its share.
    capped = engine.cap_gpu_memory(device, cfg.train.gpus_per_worker)
    if capped:
        print(f"[ray_cifar] packed: {capped}", flush=True)
    splits = make_splits(dataset, cfg.data, device)
    log, extra = ResultsLog(output), provenance()
    folder = os.path.join(output, "checkpoints")

    def record(metrics: dict, state) -> None:
        # The checkpoints first, then the row (as a study's trial saves before it reports): a stop or a full disk
        # between them leaves no row whose epoch has no checkpoint, so "the epochs finished so far" are in both.
        saved = state()
        checkpoint.save_state(saved, os.path.join(folder, "latest"))
        if saved["best"]["epoch"] == metrics["epoch"]:
            checkpoint.link_state(os.path.join(folder, "latest"), os.path.join(folder, "best"))
        log.append([epoch_row(run_id, {}, metrics, extra)])

    run_training(cfg, train_loader_for(cfg, splits.train, device, log=print), splits.val, device, on_epoch=record,
                 resume=resume)
    log.compact()
    evaluate_best_on_test(cfg, os.path.join(folder, "best"), splits.test, device, output)
    return log.read()


def evaluate_best_on_test(cfg: Config, best_folder: str, test_split, device: torch.device, output: str) -> None:
    """The test split, once, for the best epoch's weights (chosen by tune.metric on validation alone):
    printed and written to OUTPUT/test.json."""
    import json

    from .loop import build_model, evaluate_split

    if not os.path.isdir(best_folder):  # no epoch was ever best: nothing to evaluate
        print("[ray_cifar] no epoch scored (the run diverged in its first): the test split is not evaluated",
              flush=True)
        return
    state = checkpoint.load_state(best_folder)
    model = build_model(cfg, device)
    model.load_state_dict(state["model"])
    test = {"best_epoch": state["best"]["epoch"], **evaluate_split(cfg, model, test_split, device, prefix="test")}
    with open(os.path.join(output, "test.json"), "w") as f:
        json.dump(test, f, indent=1)
    print(f"[ray_cifar] test_acc {test['test_acc']:.4f} of epoch {test['best_epoch']}'s weights "
          f"(the best by {cfg.tune.metric}; evaluated once): {output}/test.json", flush=True)


def run_distributed(cfg: Config, output: str, location: str) -> int:
    from . import storage
    from .tuning import study

    cfg.tune.search_space = {}
    cfg.tune.scheduler, cfg.tune.num_samples = "fifo", 1
    cli.write_config(cfg, output)  # as run: its --resume (a study's) checks config.yaml against the run's start
    return study.run_study(cfg, output, remote=cli.output_uri(location), shared=storage.is_uri(location))


def run_local_politely(cfg: Config, dataset: Cifar10, output: str, run_id: str,
                       resume: dict | None = None) -> list[dict] | int:
    """run_local, where SIGTERM / Ctrl-C end it with a line saying what was kept and how to go on (exit 130) and a
    full disk with one line naming the path (exit 1); every epoch written before stays readable."""
    from .storage import DISK_FULL, disk_full_message

    try:
        with cli.sigterm_as_ctrl_c():
            return run_local(cfg, dataset, output, run_id, resume)
    except KeyboardInterrupt:
        ResultsLog(output).compact()
        print(f"\n[ray_cifar] stopped; the epochs finished so far are in {output}/results.parquet and "
              f"{output}/checkpoints/. Continue it with:\n  {COMMAND} --resume {output}", flush=True)
        return 130
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        cli.fail(f"{disk_full_message(e, output)}; the epochs finished before are in {output}/results.parquet "
                 f"and {output}/checkpoints/; free space, then: {COMMAND} --resume {output}", status=1)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(COMMAND, __doc__, argv, resume="run")
    with holding() as held:  # what is printed before the output folder is known begins its log
        if args.resume:
            return resume(args.resume, argv, held)
        cfg, dataset, output = cli.prepare(args, "train")
        with logged_to(output, COMMAND, argv, held):
            return run(args, cfg, dataset, output)


def resume(output: str, argv: list[str] | None, held) -> int:
    """--resume OUTPUT: a one-process run goes on from its latest checkpoint that loads (the best one, older, if the
    latest is damaged), with its own config.yaml and run id; a finished one (test.json written) is left as it is."""
    from .data.source import DataError, load_cifar10

    if not os.path.isdir(output):
        cli.fail(f"--resume {output}: no such folder")
    if not is_train_output(output):
        cli.fail(f"--resume {output}: not a one-process `{COMMAND}` run's output (no checkpoints/ beside its "
                 f"config.yaml); a study, or a DDP run (a study of one trial), goes on with python -m ray_cifar.tune "
                 f"--resume {output}")
    if os.path.exists(os.path.join(output, "test.json")):
        print(f"[ray_cifar] the run in {output} has already finished: see {output}/test.json", flush=True)
        return 0
    cfg = cli.load_resolved_config(output)
    try:
        dataset = load_cifar10(cfg.data.path, cfg.data.cache_dir)
    except DataError as e:
        cli.fail(str(e))
    ids = {r.get("trial_id") for r in ResultsLog(output).read()}
    run_id = ids.pop() if len(ids) == 1 else uuid.uuid4().hex[:8]
    folder = os.path.join(output, "checkpoints")
    found = checkpoint.newest_loadable((name, lambda name=name: checkpoint.load_state(os.path.join(folder, name)))
                                       for name in ("latest", "best") if os.path.isdir(os.path.join(folder, name)))
    with logged_to(output, COMMAND, argv, held):
        if found is None:
            print(f"[ray_cifar] no checkpoint of {output} loads: the run starts over", flush=True)
        else:
            print(f"[ray_cifar] run {run_id} resumed after epoch {found[1]['epoch']} ({found[0]} checkpoint)",
                  flush=True)
        return finish(cfg, output, run_local_politely(cfg, dataset, output, run_id, found and found[1]))


def run(args, cfg: Config, dataset: Cifar10, output: str) -> int:
    run_id = uuid.uuid4().hex[:8]
    print(f"[ray_cifar] data: {dataset.source}; run {run_id}; resolved config: {output}/config.yaml", flush=True)
    if cfg.train.num_workers > 1:
        return cli.refusing_up_front(output, lambda: run_distributed(cfg, output, args.output or output),
                                     f"python -m ray_cifar.tune --resume {args.output or output}")  # a one-trial study
    if cfg.tune.tracking != "none":
        print(f"[ray_cifar] tune.tracking={cfg.tune.tracking} is not used by a one-process run (no Tune "
              f"recorder); its rows are in {output}/results.parquet", flush=True)
    return finish(cfg, output, run_local_politely(cfg, dataset, output, run_id))


def finish(cfg: Config, output: str, rows: list[dict] | int) -> int:
    if isinstance(rows, int):
        return rows
    best = max(rows, key=lambda r: r["val_acc"])
    print(f"[ray_cifar] best val_acc {best['val_acc']:.4f} at epoch {best['epoch']}; "
          f"per-epoch rows: {output}/results.parquet; checkpoints: {output}/checkpoints/")
    return 0


if __name__ == "__main__":
    cli.exit_after(main)
