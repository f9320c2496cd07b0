"""A study driver's console, kept in OUTPUT/logs/: for after the terminal, the ssh session or the head is gone.

Everything the driver prints goes there as it goes to the screen: ray_cifar's lines, Tune's tables, the trials'
output that Ray forwards to the driver (all through sys.stdout and sys.stderr), and the records of Ray's logger
(its handler holds the stderr of Ray's import, so a handler of ours is added beside it). What bypasses Python
(a C++ library writing to the file descriptor) reaches the screen only. Ray keeps the same lines under its
session folder in /tmp, on the head: lost with it.

One file per driver session (`driver-<start>-001.log`; a --resume starts the next session's), in parts of about
PART_BYTES (`-002.log`, ...), so that the minute's copy of a bucket study's folder uploads the part being written
rather than a days-long history every minute. Colour codes are dropped. A log that cannot be written (a full
disk) stops with one line on the screen: a study never fails for its log. What an entry point prints before its
output folder is known (the data line, a resume's first line) is held in memory (`holding`) and begins the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import socket
import sys
import threading
import time
from typing import Iterator, TextIO

LOGS = "logs"  # the folder under OUTPUT
PART_BYTES = 4 * 2**20
HELD_CHARS = 2**20  # what is printed before the log starts: a few lines; more than this is screen only
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RAY_LOGGER = "ray"  # Ray's and Tune's loggers propagate to it, and it not to the root
RAY_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"  # Ray's own, as on the screen


class SessionLog:
    """The parts of one driver session's log; write() is safe from any thread and never raises."""

    def __init__(self, folder: str, stem: str, part_bytes: int = PART_BYTES):
        self.folder, self.stem, self.part_bytes = folder, stem, part_bytes
        self.lock = threading.Lock()
        self.file: TextIO | None = None
        self.part = 0
        self.size = 0
        self.stopped = False  # closed, or broken

    @property
    def path(self) -> str:
        return os.path.join(self.folder, f"{self.stem}-{self.part:03d}.log")

    def write(self, text: str) -> None:
        if self.stopped or not text:
            return
        text = ANSI.sub("", text)
        with self.lock:
            if self.stopped:
                return
            try:
                if self.file is None or self.size >= self.part_bytes:
                    self._next_part()
                self.file.write(text)
                self.size += len(text)
            except (OSError, ValueError) as e:  # a full disk, a folder removed under it
                self._stop()
                with contextlib.suppress(Exception):
                    sys.__stderr__.write(f"[ray_cifar] warning: the console log {self.path} stopped "
                                         f"({getattr(e, 'strerror', None) or e}); from here on, the screen only\n")
                    sys.__stderr__.flush()

    def _next_part(self) -> None:
        if self.file is not None:
            self.file.close()
        self.part += 1
        os.makedirs(self.folder, exist_ok=True)
        # Line-buffered: every whole line is in the file when the driver is killed.
        self.file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        self.size = 0

    def flush(self) -> None:
        with self.lock, contextlib.suppress(OSError, ValueError):
            if self.file is not None and not self.stopped:
                self.file.flush()

    def _stop(self) -> None:
        self.stopped = True
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):
                self.file.close()

    def close(self) -> None:
        with self.lock:
            self._stop()


class Tee:
    """A text stream that writes to `stream` and to `log`; everything else (isatty, fileno, encoding) is
    `stream`'s, so what checks the terminal sees the same terminal."""

    def __init__(self, stream: TextIO, log: SessionLog | Held):
        self._stream, self._log, self._gone = stream, log, False
        self._line_begun = False  # the last text written ended mid-line
        self._untold: str | None = None  # the screen's going, said in the log at the next line's start

    @classmethod
    def onto(cls, stream: TextIO, log: SessionLog, held: Held | None = None) -> Tee:
        """A tee of STREAM into LOG. Where STREAM is `holding`'s tee of HELD (whose lines LOG now begins with), a tee
        of the screen beneath it: the new tee is then the one that learns the screen is gone, and says so in LOG
        (the holding tee would say it into HELD, which takes nothing once released)."""
        if held is None or not (isinstance(stream, Tee) and stream._log is held):
            return cls(stream, log)
        tee = cls(stream._stream, log)
        tee._gone, tee._line_begun, tee._untold = stream._gone, stream._line_begun, stream._untold
        return tee

    def write(self, text: str) -> int:
        self._log.write(text)  # first: a console that is gone (a closed pipe) still leaves the line in the log
        if text:
            self._line_begun = not text.endswith("\n")
        if not self._gone:
            try:
                self._stream.write(text)
            except (OSError, ValueError) as e:
                self._console_gone(e)
        self._tell()
        return len(text)

    def _tell(self) -> None:
        """The screen's going, into the log on a line of its own (print writes a line's text and its end apart)."""
        if self._untold is not None and not self._line_begun:
            self._log.write(self._untold)
            self._untold = None

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._log.flush()
        if not self._gone:
            try:
                self._stream.flush()
            except (OSError, ValueError) as e:
                self._console_gone(e)
                self._tell()

    def _console_gone(self, error: Exception) -> None:
        """The screen went away (a closed pipe: `| head`, a `tee` or `less` that ended; a terminal hung up): a study
        of days does not fail for its screen, as it does not for its log. It goes on into the log alone, which says
        so once. The stream's descriptor then points at /dev/null: Python's flush at exit and a C++ library
        writing to it (Ray's) find nothing broken there. So does the other standard stream where it is the same pipe
        (`2>&1 | head`): Ray's log handler, which holds the stderr it found, wrote into the gone pipe, and the log got
        "--- Logging error ---" and a BrokenPipeError traceback."""
        self._gone = True
        name = getattr(self._stream, "name", None) or "the console"
        self._untold = (f"[ray_cifar] warning: {name} is gone ({getattr(error, 'strerror', None) or error}); from "
                        f"here on, only this log has what the driver prints\n")
        with contextlib.suppress(Exception):
            fd = self._stream.fileno()
            same = [other for other in (1, 2) if other != fd and os.path.sameopenfile(fd, other)]
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                for gone in (fd, *same):
                    os.dup2(devnull, gone)
            finally:
                os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class Held:
    """What a process printed before its log started: the log begins with it (release())."""

    def __init__(self, limit: int = HELD_CHARS):
        self.parts: list[str] = []
        self.left = limit
        self.lock = threading.Lock()
        self.released = False

    def write(self, text: str) -> None:
        with self.lock:
            if not self.released and self.left > 0:
                self.parts.append(text[: self.left])
                self.left -= len(self.parts[-1])

    def flush(self) -> None:
        pass

    def release(self) -> str:
        """The text held so far; from here on nothing more is held (the log has it)."""
        with self.lock:
            self.released = True
            text, self.parts = "".join(self.parts), []
            return text


@contextlib.contextmanager
def holding() -> Iterator[Held]:
    """Inside: what goes to sys.stdout and sys.stderr is also held, until `logged_to` (given the Held) starts the
    log with it. An entry point wraps all of its main in this, so the lines printed while it resolves its config,
    data and output folder are in the log too; a run refused before its folder exists leaves no log."""
    held = Held()
    previous = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(sys.stdout, held), Tee(sys.stderr, held)
    try:
        yield held
    finally:
        held.release()
        sys.stdout, sys.stderr = previous


class LogHandler(logging.Handler):
    """Log records into a SessionLog only (the logger's own handlers put them on the screen). Where Ray was imported
    after the log began (`python -m ray_cifar.train` with DDP ranks), Ray's own handler writes into one of the log's
    tees: the record is in the log already, and is not written twice."""

    def __init__(self, log: SessionLog, tees: tuple[Tee, ...] = ()):
        super().__init__()
        self.log, self.tees = log, tees
        self.setFormatter(logging.Formatter(RAY_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if any(getattr(h, "stream", None) in self.tees for h in logging.getLogger(RAY_LOGGER).handlers):
                return
            self.log.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own rule: a handler never raises
            self.handleError(record)


@contextlib.contextmanager
def logged_to(output: str, command: str, argv: list[str] | None = None,
              held: Held | None = None) -> Iterator[SessionLog]:
    """Inside: sys.stdout and sys.stderr also go to OUTPUT/logs/driver-<start>-NNN.log, which begins with a line
    naming the time, the process and the command line (`command`, the program, and its arguments: `argv`, as an
    entry point's main(argv) gets them, None for this process's own), then what `held` kept of the lines printed
    before."""
    arguments = sys.argv[1:] if argv is None else argv
    log = SessionLog(os.path.join(output, LOGS), "driver-" + time.strftime("%Y%m%d-%H%M%S"))
    log.write(f"[ray_cifar] {time.strftime('%Y-%m-%d %H:%M:%S %z')}, pid {os.getpid()} on {socket.gethostname()}: "
              + " ".join([command, *map(shlex.quote, arguments)]) + "\n")
    if held is not None:
        log.write(held.release())
    previous = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (Tee.onto(stream, log, held) for stream in previous)
    handler = LogHandler(log, (sys.stdout, sys.stderr))
    logging.getLogger(RAY_LOGGER).addHandler(handler)
    try:
        yield log
    finally:
        logging.getLogger(RAY_LOGGER).removeHandler(handler)
        sys.stdout, sys.stderr = previous
        log.close()
