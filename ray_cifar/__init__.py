"""ray_cifar: Ray Tune + ASHA studies of DDP-trained CIFAR-10 ResNets.

Layers, imports pointing down (each testable alone): config (schema, loading, presets, search) ->
registries (models, optim, augment) -> validation -> storage/data_source/sampler/data/dali_pipeline/
pipelines -> engine/checkpoint/checkpoint_store/loop (no Ray, no DALI) -> results/report -> the Ray layer, the
package ray_cifar.tuning (cluster, trial, recorder, scheduler/pbt/searchers, tracking, study) -> cli,
tune/train (entry points). Only ray_cifar.tuning and the entry points import Ray.
"""

__version__ = "0.1.0"
