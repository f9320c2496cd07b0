"""What every Ray worker process of a study runs before its first task: Ray's worker_process_setup_hook, sent in
the job's runtime_env pickled by value (cluster.job_runtime_env), so a worker needs no `import ray_cifar` for it.
Standard library only: every worker process pays for its imports.

It hides two of Ray's own reports that read as failures in a study that ran well, and nothing else.
"""

from __future__ import annotations

import logging
import sys

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
    """The hook: drop Ray's routine reports that read as failures (see above); everything else passes."""
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
