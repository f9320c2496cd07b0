"""Run a ray_cifar study on the head of a Ray cluster, against the whole cluster.

    ray submit cluster/aws-gpu.yaml cluster/study.py -- \\
        --config studies/optimizer_batch_decay_asha.yaml --data s3://BUCKET/cifar10 --output s3://BUCKET/asha-1

`ray submit` copies only this file to the head's home folder and runs it there with the
head's python, so it imports the ray_cifar installed on the node (see cluster/README.md)
and reads `studies/...` from that installed repository when the path is not found here.
Arguments after `--` are `python -m ray_cifar.tune`'s (`--help` lists them).
"""

from __future__ import annotations

import os
import sys


def resolve_config(argv: list[str], repo_root: str) -> list[str]:
    """`--config studies/x.yaml` relative to the installed repository when it is not in the cwd."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if key == "--config" and (eq or i + 1 < len(argv)):
            path = value if eq else argv[i + 1]
            if not os.path.exists(path) and os.path.exists(os.path.join(repo_root, path)):
                resolved = os.path.join(repo_root, path)
                argv[i:i + (1 if eq else 2)] = [f"--config={resolved}"]
            break
    return argv


def main(argv: list[str]) -> int:
    import ray_cifar
    from ray_cifar import tune

    os.environ.setdefault("RAY_ADDRESS", "auto")  # the cluster this head belongs to, never a new local Ray
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(ray_cifar.__file__)))
    return tune.main(resolve_config(argv, repo_root))


if __name__ == "__main__":
    from ray_cifar.cli import exit_after

    exit_after(lambda: main(sys.argv[1:]))  # as `python -m ray_cifar.tune`: a hang-up is a polite stop
