"""ray_cifar: a distributed, multi-GPU trainer and hyper-parameter tuner for CIFAR-10 ResNets."""

from setuptools import find_packages, setup

setup(
    name="ray_cifar",
    version="0.1.0",
    description="Ray Tune + ASHA studies of DDP-trained CIFAR-10 ResNets, with DALI GPU augmentation",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ray_cifar", "ray_cifar.*"]),
    # The committed data-pipeline benchmark, read by data.pipeline=auto from the installed package too.
    package_data={"ray_cifar": ["measurements/*.json"]},
    python_requires=">=3.11",  # the pinned scipy 1.17 and scikit-learn 1.9 need it
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "ray[default,tune,train]>=2.50",
        "pyarrow>=14",
        "pyyaml>=6",
        "numpy",
        "pillow",
        "matplotlib",  # ray_cifar.report figures
        "scipy>=1.10",  # t intervals and Welch's test over seed replicates (ray_cifar.results)
        # DALI is imported lazily, only by data.pipeline=dali; wheels exist for Linux x86_64 only.
        "nvidia-dali-cuda130; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3", "hypothesis==6.170.17",
                 # S3 and GCS servers on loopback: a study whose --output is a bucket
                 "moto[server]>=5", "gcp-storage-emulator>=2024.8"],
        # tune.tracking=mlflow | wandb; imported only by a study that tracks. mlflow-skinny is MLflow's client;
        # sqlalchemy + alembic give it the sqlite store a study keeps under OUTPUT by default.
        "tracking": ["mlflow-skinny>=3.0", "sqlalchemy>=2", "alembic", "wandb>=0.19"],
        # tune.search optuna | hyperopt | bohb, tune.scheduler pb2 (PB2's Gaussian process)
        "search": ["optuna>=3", "hyperopt>=0.2.7", "hpbandster>=0.7", "ConfigSpace>=0.7", "scikit-learn>=1.0"],
    },
    entry_points={"console_scripts": ["ray-cifar=ray_cifar.__main__:console"]},
)
