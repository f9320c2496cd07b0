"""ray_cifar: Ray Tune + ASHA studies of DDP-trained CIFAR-10 ResNets.

Layers, imports pointing down (each testable alone): config (schema, loading, presets, search) ->
registries (models, optim, augment) -> validation -> data_source/sampler/data/dali_pipeline/pipelines ->
engine/loop (no Ray, no DALI) -> distributed (Ray Train) -> tune/train (entry points).
"""

__version__ = "0.1.0"
