"""`ray-cifar tune ...` / `ray-cifar train ...`: the console script, same as `python -m ray_cifar.<command>`."""

from __future__ import annotations

import sys

USAGE = """usage: ray-cifar {tune,train} [options]

  tune    run a study: Ray Tune + ASHA over DDP trials   (python -m ray_cifar.tune --help)
  train   one run of one config                           (python -m ray_cifar.train --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "tune":
        from .tune import main as run
    elif command == "train":
        from .train import main as run
    else:
        print(f"ray-cifar: error: unknown command '{command}' (allowed: tune, train)", file=sys.stderr)
        return 2
    return run(rest)


def console() -> None:
    """The `ray-cifar` console script."""
    from .cli import exit_after

    exit_after(main)


if __name__ == "__main__":
    console()
