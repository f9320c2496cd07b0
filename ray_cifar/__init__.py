"""ray_cifar: Ray Tune + ASHA studies of DDP-trained CIFAR-10 ResNets.

Layers, imports pointing down (each testable alone): config (schema, loading, presets, search) ->
registries (models, optim, augment) -> validation -> storage/data_source/sampler/data/dali_pipeline/
pipelines -> engine/checkpoint/loop (no Ray, no DALI) -> results/report -> the Ray layer: ray_cluster,
trial (Ray Train), scheduler/recorder/study (Ray Tune) -> cli, tune/train (entry points).
"""

__version__ = "0.1.0"
