"""The data layer: CIFAR-10 from disk to augmented batches on the device, either pipeline; no Ray.

    source     CIFAR-10 from Parquet / pickle folder / download, the decode cache, the stratified split
    sampler    which images each rank takes each step (shared by both pipelines)
    augment    the augmentation registry (torch batch ops), mixup / cutmix
    loader     the uint8 dataset on the device, the torch train loader, evaluation batches
    dali       the DALI pipeline of one rank (imported only when DALI is chosen)
    pipelines  data.pipeline: torch, dali or auto (from ray_cifar/measurements), and the train loader factory

Nothing is imported here, so that `import ray_cifar.data.source` does not import torch's augmentations or DALI.
"""
