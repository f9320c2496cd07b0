"""What every Ray worker process of a study runs before its first task (Ray's worker_process_setup_hook, named
by module path in the job's runtime_env). Standard library only: every worker process pays for its imports.
"""

from __future__ import annotations

import logging

# Ray Train's placement-group cleaner logs this warning whenever a TorchTrainer's controller ends without its own
# shutdown. In a study that is every DDP trial: Tune ends the trial's process at its last epoch or at an ASHA stop,
# and the controller goes with it. The cleanup that follows is the cleaner's normal work, but the line reads as a
# crash, after every DDP trial. A trial that really failed says so in its status and error; a cleanup that fails
# ("Failed to clean up placement group") is still shown.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
ROUTINE_CLEANUP = "Detected that the Ray Train controller actor"


def not_routine_cleanup(record: logging.LogRecord) -> bool:
    """A logging filter: False (drop) for the routine cleanup line only."""
    return not str(record.msg).startswith(ROUTINE_CLEANUP)


def quiet_routine_ray_lines() -> None:
    """The hook: drop Ray's routine lines that read as failures (see above); everything else passes."""
    logger = logging.getLogger(CLEANER_LOGGER)
    if not_routine_cleanup not in logger.filters:
        logger.addFilter(not_routine_cleanup)
