"""The Ray layer: a study is Ray Tune trials, each one rank in its Tune trial process or a DDP Ray Train run.

    study      the driver: Tuner / Tuner.restore (--resume), replicate seeds, test evaluation, trials.parquet
    trial      one trial: the per-rank function, the TorchTrainer of a DDP trial, the Tune trial function
    cluster    Ray itself: connect or start, what a trial needs of it, how many fit at once
    scheduler  ASHA and BOHB's HyperBand, rungs rebuilt from recorded rows after a restore
    pbt        PBT / PB2 on ray_cifar's own per-epoch checkpoints
    lineage    what PBT and PB2 add to Ray's: restore from the rows, lineage, old generations dropped
    pb2        PB2's scheduler class (its own module: Ray's PB2 imports scikit-learn)
    searchers  tune.search: random, Optuna, HyperOpt, BOHB, and the search-space translation
    restorable_searchers  Optuna's, HyperOpt's and BOHB's, taking a trial their saved state lacks (its own
                          module: Ray's import Optuna, HyperOpt and BOHB's packages)
    variants   Tune's grid/random generator, making again a trial Tune's restored list lacks
    recorder   the Tune callback that writes rows and statuses (results.parquet, trials.json)
    tune_state the Tune callback that keeps a whole copy of Tune's own state files (tuner.pkl, ...)
    tracking   MLflow / W&B runs fed by the recorder
    worker_setup  what every Ray worker process of a study runs first (Ray's setup hook)

Only this package and the entry points (tune, train) import Ray; everything below it (config, data,
the engine and loop, checkpoints, results, report) runs without Ray. Nothing is imported here, so that
a Ray worker importing `ray_cifar.tuning.trial` loads only what a trial needs.
"""
