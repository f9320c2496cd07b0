"""The study driver's console kept in OUTPUT/logs/ (ray_cifar.console): a copy of what reaches the screen, in
parts, without colour codes; a log that cannot be written stops with one line and never fails the caller."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from conftest import TINY_MODEL
from ray_cifar import console
from ray_cifar.results import ResultsLog


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def read_parts(folder) -> list[str]:
    return [open(os.path.join(folder, n), encoding="utf-8").read() for n in sorted(os.listdir(folder))]


def test_the_tee_copies_to_the_log_without_colour_and_is_the_terminal_otherwise(tmp_path):
    screen = Terminal()
    log = console.SessionLog(str(tmp_path / "logs"), "driver-x")
    tee = console.Tee(screen, log)
    print("\x1b[36m(RayTrainWorker pid=1)\x1b[0m epoch 1/2", file=tee)
    tee.writelines(["a\n", "b\n"])
    tee.flush()
    assert screen.getvalue() == "\x1b[36m(RayTrainWorker pid=1)\x1b[0m epoch 1/2\na\nb\n"  # the screen: as printed
    assert tee.isatty() and tee.getvalue() == screen.getvalue()  # what checks the terminal sees the terminal
    log.close()
    assert read_parts(tmp_path / "logs") == ["(RayTrainWorker pid=1) epoch 1/2\na\nb\n"]
    tee.write("after the close\n")  # a thread still holding the tee: the screen only
    assert read_parts(tmp_path / "logs") == ["(RayTrainWorker pid=1) epoch 1/2\na\nb\n"]


def test_a_long_session_is_written_in_parts(tmp_path):
    log = console.SessionLog(str(tmp_path), "driver-x", part_bytes=100)
    lines = [f"line {i:04d} " + "x" * 29 + "\n" for i in range(20)]  # 40 characters each
    for line in lines:
        log.write(line)
    log.close()
    assert sorted(os.listdir(tmp_path)) == [f"driver-x-{n:03d}.log" for n in range(1, 8)]
    parts = read_parts(tmp_path)
    assert "".join(parts) == "".join(lines)  # nothing lost or repeated across parts, every line whole
    assert all(len(p) == 120 for p in parts[:-1])  # a new part once one reaches part_bytes


def test_a_full_disk_stops_the_log_with_one_line_and_never_raises(tmp_path, capfd):
    folder = tmp_path / "logs"
    folder.mkdir()
    os.symlink("/dev/full", folder / "driver-x-001.log")  # every write there fails: ENOSPC
    screen = io.StringIO()
    log = console.SessionLog(str(folder), "driver-x")
    tee = console.Tee(screen, log)
    for i in range(3):
        print(f"epoch {i}", file=tee)
    assert screen.getvalue() == "epoch 0\nepoch 1\nepoch 2\n"  # the screen has every line
    warnings = capfd.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("[ray_cifar] warning: the console log ")
    assert "No space left on device" in warnings[0] and warnings[0].endswith("from here on, the screen only")


def test_logged_to_keeps_prints_and_rays_log_records_then_puts_everything_back(tmp_path, capsys):
    before = sys.stdout, sys.stderr, list(logging.getLogger(console.RAY_LOGGER).handlers)
    with console.logged_to(str(tmp_path), "python -m ray_cifar.tune", ["--set", "tune.search_space={lr: 1}"]):
        print("[ray_cifar] study: 2 grid point(s)")
        print("[ray_cifar] warning: something", file=sys.stderr)
        logging.getLogger("ray.tune.tune").warning("Wrote the experiment state")  # Ray's own logger
    assert (sys.stdout, sys.stderr, logging.getLogger(console.RAY_LOGGER).handlers) == before
    out, err = capsys.readouterr()
    assert out == "[ray_cifar] study: 2 grid point(s)\n" and "[ray_cifar] warning: something" in err
    (text,) = read_parts(tmp_path / console.LOGS)
    first, *rest = text.splitlines()
    assert first.startswith("[ray_cifar] ") and first.endswith(": python -m ray_cifar.tune --set 'tune.search_space={lr: 1}'")
    assert rest[:2] == ["[ray_cifar] study: 2 grid point(s)", "[ray_cifar] warning: something"]
    assert "\tWARNING test_console.py:" in rest[2] and rest[2].endswith(" -- Wrote the experiment state")  # Ray's format
    assert len(rest) == 3


def test_rays_records_are_logged_once_when_ray_is_imported_after_the_log_began(tmp_path, capsys):
    ray_logger = logging.getLogger(console.RAY_LOGGER)
    with console.logged_to(str(tmp_path), "python -m ray_cifar.train", []):
        rays_own = logging.StreamHandler()  # what Ray's import sets up: a handler on the stderr of that moment
        ray_logger.addHandler(rays_own)
        try:
            logging.getLogger("ray.tune.tune").warning("Wrote the experiment state")
        finally:
            ray_logger.removeHandler(rays_own)
    assert capsys.readouterr().err == "Wrote the experiment state\n"
    (text,) = read_parts(tmp_path / console.LOGS)
    assert text.splitlines()[1:] == ["Wrote the experiment state"]  # through Ray's handler, not a second time


def test_each_session_has_its_own_log(tmp_path, monkeypatch):
    stamps = iter(["20261205-100000", "20261205-110000"])
    monkeypatch.setattr(console.time, "strftime", lambda fmt, *a: next(stamps) if fmt == "%Y%m%d-%H%M%S" else "T")
    for session in ("first", "resumed"):
        with console.logged_to(str(tmp_path), "python -m ray_cifar.tune", []):
            print(session)
    assert sorted(os.listdir(tmp_path / console.LOGS)) == ["driver-20261205-100000-001.log",
                                                           "driver-20261205-110000-001.log"]
    assert [p.splitlines()[1] for p in read_parts(tmp_path / console.LOGS)] == ["first", "resumed"]


def test_a_console_that_is_gone_still_leaves_the_line_in_the_log_and_fails_nothing(tmp_path):
    """A closed pipe (`| head`, a `tee` or `less` that ended) raised BrokenPipeError into whatever printed: a study's
    driver died at its next line. Now the log goes on alone and says so once; the screen is not tried again."""
    class Gone(io.StringIO):
        writes = 0

        def write(self, text):
            Gone.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

    log = console.SessionLog(str(tmp_path), "driver-x")
    tee = console.Tee(Gone(), log)
    assert tee.write("last words on screen\n") == len("last words on screen\n")
    tee.write("still logged\n")
    tee.flush()
    log.close()
    assert Gone.writes == 1
    assert read_parts(tmp_path) == ["last words on screen\n[ray_cifar] warning: the console is gone (Broken pipe); "
                                    "from here on, only this log has what the driver prints\nstill logged\n"]


def test_a_screen_gone_after_the_log_began_is_said_in_the_log(tmp_path, monkeypatch):
    """An entry point's tees nest: `holding`'s (into memory, until the log begins), then the log's. A pipe that closed
    after the log began (`| head -1` of a study) was found by the holding tee, whose warning went into the released
    memory: the log never said the screen went."""
    class Screen(io.StringIO):
        closed_pipe = False

        def write(self, text):
            if self.closed_pipe:
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    screen = Screen()
    monkeypatch.setattr(sys, "stdout", screen)
    with console.holding() as held:
        print("before the log")
        with console.logged_to(str(tmp_path), "cmd", [], held):
            print("the first line")
            screen.closed_pipe = True
            print("after the screen went")
            print("the last line")
    assert screen.getvalue() == "before the log\nthe first line\n"
    logged = "".join(read_parts(tmp_path / console.LOGS))
    assert logged.endswith("before the log\nthe first line\nafter the screen went\n[ray_cifar] warning: the console is "
                           "gone (Broken pipe); from here on, only this log has what the driver prints\nthe last line\n")


def test_a_run_whose_stdout_pipe_closes_trains_to_its_end_into_its_log(synthetic_parquet_dir, tmp_path):
    """A real run (`python -m ray_cifar.train`, the same console as a study's driver) whose reader is gone before
    its first line: it ended at its first print with a BrokenPipeError traceback (exit 1). Now it trains to its
    end, exit 0, its log holds its lines and says the screen went, and nothing is printed about the pipe at exit."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -0`: the reader is gone before the first line
    output = tmp_path / "run"
    sets = TINY_MODEL + ["train.epochs=2", "data.val_size=100", "train.global_batch_size=100", "data.pipeline=torch",
                         "train.torch_threads=1"]
    argv = [sys.executable, "-m", "ray_cifar.train", "--data", synthetic_parquet_dir, "--output", str(output)]
    try:
        done = subprocess.run(argv + [a for s in sets for a in ("--set", s)], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=300, env={**os.environ, "RAY_CIFAR_CACHE": str(tmp_path / "cache")})
    finally:
        os.close(write_end)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, \
        done.stderr[-3000:]
    assert [r["epoch"] for r in ResultsLog(str(output)).read()] == [1, 2]
    logged = "".join(read_parts(output / "logs"))
    assert "<stdout> is gone (Broken pipe); from here on, only this log has what the driver prints" in logged, logged
    assert logged.count("is gone") == 1 and "epoch 2" in logged.split("is gone", 1)[1], logged[-3000:]


def test_what_is_printed_before_the_log_starts_begins_it_once(tmp_path, capsys):
    before = sys.stdout, sys.stderr
    with console.holding() as held:
        print("cifar10: using cache X for parquet:DIR")
        print("[ray_cifar] warning: --set train.epochs=3 has no effect", file=sys.stderr)
        with console.logged_to(str(tmp_path), "python -m ray_cifar.train", [], held):
            print("[ray_cifar] epoch 1/1")
        print("after the log")  # the screen only: held no more
    assert (sys.stdout, sys.stderr) == before
    out, err = capsys.readouterr()
    assert out == "cifar10: using cache X for parquet:DIR\n[ray_cifar] epoch 1/1\nafter the log\n"
    assert err == "[ray_cifar] warning: --set train.epochs=3 has no effect\n"
    (text,) = read_parts(tmp_path / console.LOGS)
    assert text.splitlines()[1:] == ["cifar10: using cache X for parquet:DIR",
                                     "[ray_cifar] warning: --set train.epochs=3 has no effect", "[ray_cifar] epoch 1/1"]
    assert held.release() == ""


def test_what_is_held_is_bounded_and_a_refusal_puts_the_streams_back(capsys):
    held = console.Held(limit=10)
    held.write("0123456")
    held.write("789abcdef")
    assert held.release() == "0123456789"  # a process that prints much before a log: only the first limit kept
    before = sys.stdout, sys.stderr
    with pytest.raises(SystemExit), console.holding():  # a run refused before its output folder exists
        print("ray_cifar: error: output folder X already exists", file=sys.stderr)
        sys.exit(2)
    assert (sys.stdout, sys.stderr) == before and "already exists" in capsys.readouterr().err


BOTH_STREAMS_TO_ONE_PIPE = """
import logging, os, sys
from ray_cifar.console import logged_to

read_end, write_end = os.pipe()
os.close(read_end)  # `2>&1 | head`: the reader gone, stdout and stderr one pipe
os.dup2(write_end, 1)
os.dup2(write_end, 2)
logger = logging.getLogger("ray")
logger.addHandler(logging.StreamHandler(sys.stderr))  # Ray's: it holds the stderr it found at its import
logger.propagate = False
with logged_to(sys.argv[1], "cmd"):
    print("the first line after head left", flush=True)
    logger.warning("a record of Ray's logger")
    print("the last line", flush=True)
"""


def test_a_pipe_that_takes_stdout_and_stderr_leaves_no_logging_error_in_the_log(tmp_path):
    """`... 2>&1 | head -3`: the study went on, but its log got "--- Logging error ---" and a 40-line BrokenPipeError
    traceback: Ray's handler still wrote to the stderr that shared the gone pipe."""
    done = subprocess.run([sys.executable, "-c", BOTH_STREAMS_TO_ONE_PIPE, str(tmp_path)], timeout=120)
    assert done.returncode == 0
    logged = "".join(read_parts(tmp_path / "logs"))
    assert "a record of Ray's logger" in logged and "the last line" in logged, logged
    assert "Logging error" not in logged and "Traceback" not in logged, logged
