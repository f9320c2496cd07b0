"""What every Ray worker process of a study runs before its first task: Ray's worker_process_setup_hook, sent in
the job's runtime_env pickled by value (cluster.job_runtime_env), so a worker needs no `import ray_cifar` for it.
Standard library only: every worker process pays for its imports.

It hides two of Ray's own reports that read as failures in a study that ran well, and ends a training thread still
running when its process exits before Python does it the way that aborts (`stop_training_threads`).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import sys
import threading
import time

# Ray Train's placement-group cleaner logs this warning whenever a TorchTrainer's controller ends without its own
# shutdown. In a study that is every DDP trial: Tune ends the trial's process at its last epoch or at an ASHA stop,
# and the controller goes with it. The cleanup that follows is the cleaner's normal work, but the line reads as a
# crash, after every DDP trial. A trial that really failed says so in its status and error; a cleanup that fails
# ("Failed to clean up placement group") is still shown.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
ROUTINE_CLEANUP = "Detected that the Ray Train controller actor"

# Ray ends its worker processes with SIGTERM (a study's end, a stopped trial); its handler raises SystemExit.
# When the signal lands while Python runs a callback that cannot raise (a weakref's, a __del__), Python prints
# "Exception ignored in: ..." with a traceback ending in Ray's `sigterm_handler` and "SystemExit: 1", and the
# process goes on until Ray ends it. Seen in CI after a study that ended well. Such a report is dropped; every
# other one is printed as Python would.
RAY_SIGTERM_HANDLER = "sigterm_handler"


# Ray ends a stopped DDP trial's ranks with SIGTERM (and every worker at a study's end). The SIGTERM's SystemExit ends
# the main thread, and Python ends the process. A rank's training thread (a daemon) still inside torch's C++ then,
# a backward, is ended by Python from under it as the interpreter finalizes: its next take of the GIL calls
# pthread_exit, which unwinds through torch's C++ and aborts, ~95 lines of C++ stack and "Fatal Python error: Aborted"
# in the study's console after a study that ran well (1 of 7 small DDP ASHA studies here; every plain process exiting
# mid-backward). atexit handlers run before Python finalizes: there each thread still in ray_cifar's training loop
# gets SystemExit raised in it, met at its next Python bytecode (the op it is in ends first), and is waited for.
# A thread waiting on a lock is left alone: it holds no torch C++ state, and an exception raised in it would only be
# met once the lock came (a one-rank trial's thread waiting in tune.report for Tune: the exit waited the whole 3 s).
TRAINING_LOOP = os.path.join("ray_cifar", "loop.py")
WAITING_IN = ("threading.py", "queue.py")
STOP_TRAINING_WAIT_S = 3.0  # a few training steps on a GPU; Ray's own kill follows in any case


def training_threads() -> list[int]:
    """The idents of the threads but this one that are inside ray_cifar's training loop now, not waiting on a lock."""
    found = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident() or os.path.basename(frame.f_code.co_filename) in WAITING_IN:
            continue
        while frame is not None:
            if frame.f_code.co_filename.endswith(TRAINING_LOOP):
                found.append(ident)
                break
            frame = frame.f_back
    return found


def stop_training_threads(wait_s: float = STOP_TRAINING_WAIT_S) -> list[int]:
    """SystemExit raised in every thread inside the training loop, each waited for up to wait_s in all; the idents
    of those still in it then (a thread blocked in C++ for good, e.g. on a collective its peer will never join)."""
    threads = training_threads()
    for ident in threads:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(SystemExit))
    deadline = time.monotonic() + wait_s
    while threads and time.monotonic() < deadline:
        time.sleep(0.01)
        threads = [ident for ident in threads if ident in training_threads()]
    return threads


def not_routine_cleanup(record: logging.LogRecord) -> bool:
    """A logging filter: False (drop) for the routine cleanup line only."""
    return not str(record.msg).startswith(ROUTINE_CLEANUP)


def is_rays_sigterm_exit(unraisable) -> bool:
    """An unraisable exception (sys.unraisablehook's argument) that is Ray's SIGTERM handler exiting."""
    if unraisable.exc_type is None or not issubclass(unraisable.exc_type, SystemExit):
        return False
    tb = unraisable.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == RAY_SIGTERM_HANDLER:
            return True
        tb = tb.tb_next
    return False


def quiet_routine_ray_lines() -> None:
    """The hook: drop Ray's routine reports that read as failures (see above), everything else passes; and stop
    the training threads at the process's exit (stop_training_threads)."""
    if not getattr(atexit, "ray_cifar_stops_training_threads", False):
        atexit.register(stop_training_threads)
        atexit.ray_cifar_stops_training_threads = True
    logger = logging.getLogger(CLEANER_LOGGER)
    if not_routine_cleanup not in logger.filters:
        logger.addFilter(not_routine_cleanup)
    if not getattr(sys.unraisablehook, "drops_rays_sigterm_exits", False):
        previous = sys.unraisablehook

        def unraisablehook(unraisable) -> None:
            if not is_rays_sigterm_exit(unraisable):
                previous(unraisable)

        unraisablehook.drops_rays_sigterm_exits = True
        sys.unraisablehook = unraisablehook
