"""ray_cifar: Ray Tune + ASHA studies of DDP-trained CIFAR-10 ResNets.

Layers (each testable alone): config -> data_source/data/augment -> models/optim ->
engine/training (no Ray, no DALI) -> distributed (Ray Train) -> tune (Ray Tune).
"""

__version__ = "0.1.0"
