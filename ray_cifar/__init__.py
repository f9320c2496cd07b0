"""ray_cifar: Ray Tune + ASHA studies of DDP-trained CIFAR-10 ResNets.

Layers, imports pointing down (each testable alone):
    config (schema, loading, presets, search)
    -> models, optim (registries), engine, checkpoint, storage, results (no Ray, no DALI)
    -> validation (checked configs)
    -> the data layer, ray_cifar.data (source, sampler, augment, loader, dali, pipelines)
    -> loop, checkpoint_store (the one training loop; no Ray, no DALI), report
    -> the Ray layer, ray_cifar.tuning (cluster, trial, recorder, scheduler/pbt/searchers, tracking, study)
    -> cli, tune / train (entry points).
Only ray_cifar.tuning and the entry points import Ray; only ray_cifar.data.dali imports DALI.
"""

__version__ = "0.1.0"
