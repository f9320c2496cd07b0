"""The entry points as a user runs them: bad input stops before any work, one line, exit 2.

Also one real single-process run of `python -m ray_cifar.train` on synthetic Parquet data.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shlex
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL
from ray_cifar import console


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def run_main(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` as `run` gives it, but MODULE's main() in this process: the same parsing, checks,
    error line and exit status, without a new interpreter importing torch and Ray (~3 s a case on 2 cores). A
    case per entry point still runs as a real process (`run`): nothing else may print at start-up."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = importlib.import_module(module).main(list(args))
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():  # a mistake that should stop before any work started Ray in this test process
            ray.shutdown()
            pytest.fail(f"{module} {' '.join(args)} started Ray before it refused")
    return subprocess.CompletedProcess([module, *args], status, out.getvalue(), err.getvalue())


@pytest.fixture
def corrupt_dir(tmp_path):
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "train.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (d / "test.parquet").write_bytes(b"PAR1 nor this")
    return str(d)


@pytest.mark.parametrize("module", ["ray_cifar.tune", "ray_cifar.train"])
@pytest.mark.parametrize("case", ["unknown key", "bad value", "unknown optimizer", "missing data", "corrupt parquet",
                                  "searched bad value"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(module, case, tmp_path, synthetic_parquet_dir, corrupt_dir):
    data, extra = synthetic_parquet_dir, []
    expected = {
        "unknown key": ("--set", "train.epoch=3", "unknown key 'train.epoch'"),
        "bad value": ("--set", "optim.lr=-1", "optim.lr: must be > 0"),
        "unknown optimizer": ("--set", "optim.name=lbfgsx", "optim.name: unknown 'lbfgsx'"),
        "missing data": (None, None, "does not exist; pass --data DIR or set RAY_CIFAR_DATA"),
        "corrupt parquet": (None, None, "train.parquet"),
        "searched bad value": ("--set", "tune.search_space={optim.name: {grid: [sgd, nadamx]}}",
                               "tune.search_space.optim.name: value 'nadamx'"),
    }[case]
    flag, value, message = expected
    if flag:
        extra = [flag, value]
    if case == "missing data":
        data = str(tmp_path / "no_such_folder")
    if case == "corrupt parquet":
        data = corrupt_dir
    output = tmp_path / "out"
    # One case per entry point as a real process; the rest in this one.
    result = (run if case == "unknown key" else run_main)(module, "--data", data, "--output", str(output), *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ray_cifar: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_existing_output_folder_is_refused(tmp_path, synthetic_parquet_dir):
    output = tmp_path / "out"
    output.mkdir()
    (output / "results.parquet").write_text("earlier results")
    result = run("ray_cifar.tune", "--data", synthetic_parquet_dir, "--output", str(output))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (output / "results.parquet").read_text() == "earlier results"


def test_help_shows_an_example():
    for module in ("ray_cifar.tune", "ray_cifar.train"):
        result = run(module, "--help")
        assert result.returncode == 0
        assert f"python -m {module}" in result.stdout and "--smoke-test" in result.stdout


@pytest.mark.parametrize("module", ["tune", "train", "report"])
def test_help_says_each_default_once_and_never_none(module, capsys):
    """Each option says its default in its own words where it means something; argparse's
    "(default: None)" / "(default: False)" after such a text says nothing (or the opposite)."""
    import importlib
    import re

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"ray_cifar.{module}").main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage: python -m ray_cifar." + module in text
    flat = " ".join(text.split())  # help texts wrap: a "(default: ...)" may span two lines
    assert "(default: None)" not in flat and "(default: False)" not in flat and "(default: [])" not in flat
    options = re.split(r"\s(?=--?[a-z][a-z-]* )", flat.split("options:")[1])
    assert all(option.count("(default:") <= 1 for option in options), [o for o in options if o.count("(default:") > 1]


def test_resume_if_exists_needs_an_output(capsys):
    from ray_cifar import tune

    with pytest.raises(SystemExit) as exit_:
        tune.main(["--resume-if-exists", "--smoke-test"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--resume-if-exists needs --output" in err


def test_resume_if_exists_on_a_train_runs_output_says_only_what_it_is(tmp_path, capsys):
    """It said "holds a study: continuing it", then that the folder was no study for want of a config.yaml it had."""
    from ray_cifar import tune

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("train: {epochs: 2}\n")
    with pytest.raises(SystemExit) as exit_:
        tune.main(["--resume-if-exists", "--output", str(tmp_path)])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and "holds a study" not in captured.out, captured
    assert captured.err == (f"ray_cifar: error: --resume-if-exists --output {tmp_path}: not a ray_cifar study output "
                            f"(no Tune experiment in ray/tune: a `python -m ray_cifar.train` run's output "
                            f"(checkpoints/, no study))\n")  # (it said --resume, which was not given)


def test_resume_names_a_missing_folder_and_the_options_it_ignores(tmp_path, capsys):
    """--resume /no/such said "not a ray_cifar study output (no config.yaml ...)"; --set and --config beside it
    were ignored without a word (a user who asked for more epochs got the old study)."""
    from ray_cifar import tune

    with pytest.raises(SystemExit) as exit_:
        tune.main(["--resume", str(tmp_path / "gone"), "--set", "train.epochs=50", "--config", "x.yaml"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.err == f"ray_cifar: error: --resume {tmp_path / 'gone'}: no such folder\n"
    assert "[ray_cifar] --resume ignores --config, --set: the study goes on with its own config.yaml" in captured.out


def test_single_process_train_writes_per_epoch_rows(tmp_path, synthetic_parquet_dir):
    output = tmp_path / "run"
    sets = [a for s in TINY_MODEL + ["train.epochs=3", "train.global_batch_size=50", "data.val_size=100",
                                     "train.num_workers=1", "optim.lr=0.05"] for a in ("--set", s)]
    result = run("ray_cifar.train", "--data", synthetic_parquet_dir, "--output", str(output), *sets, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epoch 3/3" in result.stdout
    rows = pq.read_table(output / "results.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for column in ("trial_id", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                   "images_per_second", "num_workers", "git_sha", "torch_version"):
        assert column in rows[0], column
    assert rows[-1]["val_acc"] > 0.5  # colour-coded classes: far above the 0.1 of chance
    assert rows[0]["lr"] == pytest.approx(0.05)  # cosine starts at the peak
    assert os.path.exists(output / "config.yaml")
    # The test split, once, for the best epoch's weights (what a study does for its best trial).
    test = json.loads((output / "test.json").read_text())
    best = max(rows, key=lambda r: r["val_acc"])["epoch"]
    assert test["best_epoch"] == best and test["test_acc"] > 0.5 and f"test_acc {test['test_acc']:.4f}" in result.stdout
    # Its console is kept too: every line, the data's (printed before the output folder exists) included.
    (log,) = (output / console.LOGS).iterdir()
    first, *lines = log.read_text().splitlines()
    assert first.endswith(": python -m ray_cifar.train " + shlex.join(["--data", synthetic_parquet_dir, "--output",
                                                                       str(output), *sets]))
    assert lines == result.stdout.splitlines() and lines[0].startswith("cifar10: ")


# ---------------------------------------------------------------------------
# Mistakes only the data (600 synthetic train images) or the machine reveal: caught before any trial,
# for the fixed config (both entry points) and inside the search space (python -m ray_cifar.tune;
# python -m ray_cifar.train ignores the search space). One line, exit 2, no output folder.

NO_SEARCH = "tune.search_space={}"
FIXED_MISTAKES = {
    "batch larger than the train images": (["data.val_size=100", "train.global_batch_size=512", NO_SEARCH],
                                           "train.global_batch_size: larger than the 500 train images"),
    "val_size takes every image": (["data.val_size=600", "train.global_batch_size=128", NO_SEARCH],
                                   "data.val_size: must be less than the 600 train images"),
    "val_fraction leaves none": (["data.val_size=null", "data.val_fraction=0.9995", "train.global_batch_size=128",
                                  NO_SEARCH], "data.val_fraction: leaves none of the 600 train images"),
    "subset smaller than a batch": (["data.val_size=100", "data.train_subset=100", "train.global_batch_size=128",
                                     NO_SEARCH], "data.train_subset: smaller than one global batch"),
    "more ranks than cores": (["data.val_size=100", "train.num_workers=256", "train.global_batch_size=256", NO_SEARCH],
                              "train.num_workers: a trial needs 256 rank(s)"),
    "more CPUs per rank than cores": (["data.val_size=100", "train.cpus_per_worker=4096",
                                       "train.global_batch_size=128", NO_SEARCH],
                                      "train.cpus_per_worker: a trial needs 1 rank(s) x 4096 CPUs"),
    "a GPU share on CPU ranks": (["data.val_size=100", "train.use_gpu=false", "train.gpus_per_worker=0.5",
                                  "train.global_batch_size=128", NO_SEARCH],
                                 "train.gpus_per_worker: a share of a GPU has no effect with train.use_gpu false"),
}
SEARCHED_MISTAKES = {
    "batch in a grid": (["data.val_size=100", "tune.search_space={train.global_batch_size: {grid: [128, 1024]}}"],
                        "the trial with train.global_batch_size=1024: train.global_batch_size: larger than the 500"),
    "val_size in variants": (["data.val_size=100", "train.global_batch_size=128",
                              "tune.search_space={variants: {grid: [{data.val_size: 100}, {data.val_size: 600}]}}"],
                             "data.val_size: must be less than the 600 train images"),
    "subset in a section bundle": (["data.val_size=100", "train.global_batch_size=128",
                                    "tune.search_space={data: {grid: [{train_subset: 400}, {train_subset: 64}]}}"],
                                   "data.train_subset: smaller than one global batch"),
    "batch against a searched subset": (["data.val_size=100", "tune.search_space={data.train_subset: {grid: [400, 200]},"
                                         " train.global_batch_size: {grid: [128, 256]}}"],
                                        "data.train_subset=200, train.global_batch_size=256: data.train_subset"),
    "ranks in a bundle": (["data.val_size=100", "train.global_batch_size=256",
                           "tune.search_space={train: {grid: [{num_workers: 1}, {num_workers: 256}]}}"],
                          "train.num_workers: a trial needs 256 rank(s)"),
}


def assert_one_line_exit_2(result: subprocess.CompletedProcess, message: str, output) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ray_cifar: error: ") and message in lines[0], lines[0]
    assert not output.exists()


@pytest.mark.parametrize("module", ["ray_cifar.tune", "ray_cifar.train"])
@pytest.mark.parametrize("case", list(FIXED_MISTAKES))
def test_data_and_resource_mistakes_stop_before_any_trial(module, case, tmp_path, synthetic_parquet_dir):
    sets, message = FIXED_MISTAKES[case]
    output = tmp_path / "out"
    result = run_main(module, "--data", synthetic_parquet_dir, "--output", str(output),
                      *[a for s in sets for a in ("--set", s)])
    assert_one_line_exit_2(result, message, output)


@pytest.mark.parametrize("case", list(SEARCHED_MISTAKES))
def test_searched_data_and_resource_mistakes_stop_the_study_before_any_trial(case, tmp_path, synthetic_parquet_dir):
    sets, message = SEARCHED_MISTAKES[case]
    output = tmp_path / "out"
    result = run_main("ray_cifar.tune", "--data", synthetic_parquet_dir, "--output", str(output),
                      *[a for s in sets for a in ("--set", s)])
    assert_one_line_exit_2(result, message, output)
    assert "tune.search_space: the trial with " in result.stderr


def test_a_mistake_in_the_studys_own_setting_is_not_blamed_on_its_search(tmp_path, synthetic_parquet_dir):
    """The up-front check runs every trial of the search space; a value no trial searches was refused as "the trial
    with optim.lr=0.1: ...", as if the search were at fault. Named plainly now; a searched value's still is (above)."""
    output = tmp_path / "out"
    result = run_main("ray_cifar.tune", "--data", synthetic_parquet_dir, "--output", str(output), "--set",
                      "data.val_size=600", "--set", "tune.search_space={optim.lr: {grid: [0.1, 0.01]}}")
    assert_one_line_exit_2(result, "ray_cifar: error: --set data.val_size=600: data.val_size: must be less than the "
                                   "600 train images (got 600)", output)


def test_a_smoke_test_refused_for_its_presets_value_says_the_preset_set_it(tmp_path, synthetic_parquet_dir):
    """--smoke-test's preset holds out 2,000 validation images, sized for CIFAR-10: on a smaller data folder the
    refusal named a value the user never wrote. It says where it came from, unless --set gave it."""
    output = tmp_path / "out"
    result = run_main("ray_cifar.tune", "--smoke-test", "--data", synthetic_parquet_dir, "--output", str(output))
    assert_one_line_exit_2(result, "data.val_size: must be less than the 600 train images (got 2000); --smoke-test "
                                   "sets data.val_size=2000, sized for CIFAR-10's 50,000 train images: add --set "
                                   "data.val_size=...", output)
    result = run_main("ray_cifar.tune", "--smoke-test", "--data", synthetic_parquet_dir, "--output", str(output),
                      "--set", "data.val_size=700")
    assert_one_line_exit_2(result, "--set data.val_size=700: data.val_size: must be less than the 600 train images "
                                   "(got 700)", output)
    assert "--smoke-test sets" not in result.stderr
    # A bound the preset put on a --set's field: the --set is named, and the preset's value.
    result = run_main("ray_cifar.tune", "--smoke-test", "--data", synthetic_parquet_dir, "--output", str(output),
                      "--set", "data.val_size=100", "--set", "tune.max_epochs=50")
    assert_one_line_exit_2(result, "--set tune.max_epochs=50: tune.max_epochs: must be in [1, train.epochs=6] (got 50);"
                                   " --smoke-test sets train.epochs=6, sized for CIFAR-10's 50,000 train images: add "
                                   "--set train.epochs=...", output)


def test_a_smoke_test_says_what_it_changed_in_the_study(tmp_path, synthetic_parquet_dir, capsys):
    """optimizer_batch_decay_asha's smoke run judged at grace 1, reduction 2 and batch 128 where its file says grace
    5, reduction 3 and batch 64, and nothing said so."""
    from ray_cifar import cli

    args = cli.parse_args("python -m ray_cifar.tune", "", ["--smoke-test", "--config",
                                                           "studies/optimizer_batch_decay_asha.yaml",
                                                           "--data", synthetic_parquet_dir, "--output",
                                                           str(tmp_path / "out"), "--set", "data.val_size=100"])
    cli.prepare(args, "tune")
    printed = [line for line in capsys.readouterr().out.splitlines() if "--smoke-test changed" in line]
    assert len(printed) == 1
    for change in ("tune.grace_period 5 -> 1", "tune.reduction_factor 3.0 -> 2.0", "train.global_batch_size 64 -> 128",
                   "model.blocks [3, 6, 4, 3] -> [1, 1, 1]", "the search space cut to 2 of its 12 point(s)"):
        assert change in printed[0], change
    assert "data.val_size" not in printed[0]  # --set gave it: not the preset's change
    # The steps set this study's length, and its variants (each an optimizer's schedule in steps) were rescaled.
    assert "train.epochs 30 -> 6 (not the length: train.max_steps is)" in printed[0]
    # Which field inside the variants: "the values of variants" left the user to find it.
    assert printed[0].endswith("and not only cut: the preset changed the values of schedule.step_every_iters in "
                               "variants too")
    cut = {"optim.lr": {"grid": [0.1, 0.001]}, "train.global_batch_size": {"grid": [128, 256]}}
    assert cli._rescaled({"optim.lr": {"grid": [0.1, 0.01, 0.001]}, "train.global_batch_size": {"grid": [128, 512]}},
                         cut) == ["train.global_batch_size"]
    own = {"variants": {"grid": [{"optim.lr": 0.1, "train.epochs": 30}, {"optim": {"lr": 0.2}, "train.epochs": 60}]}}
    smoke = {"variants": {"grid": [{"optim.lr": 0.1, "train.epochs": 6}, {"optim": {"lr": 0.2}, "train.epochs": 12}]}}
    assert cli._rescaled(own, smoke) == ["train.epochs in variants"] and cli._rescaled(own, own) == []
    # A range is not cut and its ends are not points: one loguniform beside 4 x 4 x 4 choices was "16 of 128".
    bohb = cli.parse_args("python -m ray_cifar.tune", "", ["--smoke-test", "--config",
                                                           "studies/optimizer_batch_decay_bohb.yaml"])
    line = cli.smoke_changes(bohb, cli.load_config(bohb.config, [], smoke_test=True))
    assert "the search space's lists cut to 8 of their 64 combination(s) (its range of optim.lr not cut)" in line
    args.smoke_test = False
    assert cli.smoke_changes(args, cli.load_config(args.config, args.sets)) is None
    # A --set valid only in the smoke run (max 2 epochs under the study's grace 5): the line was left out.
    args = cli.parse_args("python -m ray_cifar.tune", "", ["--smoke-test", "--config",
                                                           "studies/adam_batch_lr_grid_asha.yaml",
                                                           "--set", "tune.max_epochs=2"])
    line = cli.smoke_changes(args, cli.load_config(args.config, args.sets, smoke_test=True))
    assert line is not None and "tune.grace_period 5 -> 1" in line and "tune.max_epochs" not in line


def test_a_train_subset_larger_than_the_data_left_says_all_of_it_is_used(capsys):
    from ray_cifar import cli
    from ray_cifar.config import Config

    cfg = Config()
    cfg.data.val_size, cfg.data.train_subset, cfg.train.global_batch_size = 100, 8000, 100
    cli.check_before_trials(cfg, 600, searched=False)
    assert capsys.readouterr().out == ("[ray_cifar] warning: data.train_subset=8000 is more than the 500 train images "
                                       "left after validation: every one of them is used\n")
    cfg.data.train_subset = 500
    cli.check_before_trials(cfg, 600, searched=False)
    assert capsys.readouterr().out == ""


def test_a_decay_the_run_ends_before_is_warned_of_before_any_trial(capsys):
    """--set train.epochs=10 on adam_batch_lr_grid (a decay every 20 epochs) trained 18 trials at a constant lr."""
    from ray_cifar import cli
    from ray_cifar.validation import load_config

    study = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies",
                         "adam_batch_lr_grid.yaml")
    cfg = load_config(study, ["train.epochs=10", "train.num_workers=1"])
    cli.check_before_trials(cfg, 50000, searched=True)
    assert capsys.readouterr().out == (
        "[ray_cifar] warning: schedule.step_every_epochs=20.0: the run's 10 epoch(s) (train.epochs) end before the "
        "first decay; the lr never decays (a constant lr) (shorten it too, or shorten the run with --budget-scale X, "
        "which scales every length together)\n")
    cli.check_before_trials(load_config(study, ["train.num_workers=1"], budget_scale=0.2), 50000, searched=True)
    assert capsys.readouterr().out == ""


EXIT_AFTER = """
import atexit, sys, threading, time
from ray_cifar.cli import exit_after

def main():
    atexit.register(lambda: open(sys.argv[1], "a").write("atexit ran\\n"))
    # A non-daemon thread still writing when main returns: a normal exit waits for it, and so must this one.
    threading.Thread(target=lambda: (time.sleep(0.5), open(sys.argv[1], "a").write("thread ended\\n"))).start()
    sys.stdout.write("no newline, not flushed")
    case = sys.argv[2]
    if case == "return":
        return 3
    if case == "fail":
        sys.exit("exit_after: a message")
    if case == "none":
        return None
    if case == "ctrl-c":  # in the first seconds, before the program's own handlers
        raise KeyboardInterrupt
    raise RuntimeError("an exception takes the normal way out")

exit_after(main)
"""


@pytest.mark.parametrize("case, status", [("return", 3), ("fail", 1), ("none", 0), ("raise", 1), ("ctrl-c", 130)])
def test_exit_after_keeps_what_a_normal_exit_does(tmp_path, case, status):
    """The entry points end with cli.exit_after (no teardown of the modules): the same status, output flushed,
    non-daemon threads waited for and atexit hooks run, in that order."""
    log = tmp_path / "log"
    proc = subprocess.run([sys.executable, "-c", EXIT_AFTER, str(log), case], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "no newline, not flushed"
    assert log.read_text() == "thread ended\natexit ran\n"
    expected_stderr = {"fail": "exit_after: a message\n", "raise": "RuntimeError: an exception",
                       "ctrl-c": "\n[ray_cifar] stopped (Ctrl-C) while starting\n"}
    assert expected_stderr.get(case, "") in proc.stderr and (case in expected_stderr or proc.stderr == "")


def test_entry_points_end_through_exit_after():
    for module in ("tune", "train", "__main__"):
        source = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ray_cifar",
                                   f"{module}.py")).read()
        tail = source[source.index('if __name__ == "__main__":'):]
        assert "exit_after" in tail or "console()" in tail, module


def test_a_ddp_train_runs_config_yaml_is_the_config_it_runs_so_its_resume_is_taken(tmp_path, monkeypatch):
    """A DDP `train` run is a study of one trial: its search space, scheduler and samples are dropped before the
    study starts, and config.yaml kept them. Its --resume (the study's) then found config.yaml changed since the
    start and refused it."""
    from ray_cifar import cli, train
    from ray_cifar.tuning import study
    from ray_cifar.validation import load_config

    cfg = load_config(None, ["train.num_workers=2", "tune.search_space={optim.lr: {grid: [0.1, 0.01]}}"])
    output = tmp_path / "run"
    output.mkdir()
    cli.write_config(cfg, str(output))
    monkeypatch.setattr(study, "run_study", lambda cfg, output, **kw: study.check_start(cfg, output, None) or 0)
    assert train.run_distributed(cfg, str(output), str(output)) == 0
    study.check_start(cli.load_resolved_config(str(output)), str(output), None)  # the resume's check: no change
