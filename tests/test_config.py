"""Config: defaults, YAML then --set overrides, and one-line errors that name the key."""

from __future__ import annotations

import pytest

from ray_cifar.config import SMOKE_OVERRIDES, Config, ConfigError, field_docs, parse_set, search_keys
from ray_cifar.validation import config_from_dict, load_config, trial_config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_validate_and_every_field_is_documented():
    cfg = load_config()
    assert cfg.train.global_batch_size == 512 and cfg.model.name == "resnet18"
    docs = field_docs()
    for section, fields in cfg.to_dict().items():
        for name in fields:
            assert docs.get(f"{section}.{name}"), f"{section}.{name} has no comment"


def test_yaml_then_set_overrides(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 7\n  global_batch_size: 256\noptim:\n  weight_decay: 5e-4\n")
    cfg = load_config(path, ["train.epochs=3", "model.blocks=[1, 1]", "model.widths=[8,16]", "optim.name=adam"])
    assert cfg.train.epochs == 3  # --set wins over the file
    assert cfg.train.global_batch_size == 256
    assert cfg.model.blocks == [1, 1]
    assert cfg.optim.name == "adam"
    assert cfg.optim.weight_decay == 5e-4  # YAML 1.1 reads 5e-4 as text; still a number here


def test_parse_set_reads_values_as_yaml():
    assert parse_set("train.epochs=5") == ("train.epochs", 5)
    assert parse_set("train.use_gpu=null") == ("train.use_gpu", None)
    assert parse_set("optim.name=sgd") == ("optim.name", "sgd")
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_set("train.epochs")


@pytest.mark.parametrize("sets, message", [
    (["train.epoch=5"], r"unknown key 'train.epoch' \(allowed in train: epochs, "),
    (["trian.epochs=5"], r"unknown key 'trian.epochs' \(sections: data, model"),
    (["train.epochs=five"], r"train.epochs: expected an integer, got 'five'"),
    (["train.epochs=2.5"], r"train.epochs: expected an integer"),
    (["train.channels_last=3"], r"train.channels_last: expected true/false"),
    (["train.epochs=0"], r"train.epochs: must be >= 1 \(got 0\)"),
    (["train.global_batch_size=0"], r"train.global_batch_size: must be >= 1 \(got 0\)"),
    (["train.eval_batch_size=0"], r"train.eval_batch_size: must be >= 1 or null \(got 0\)"),
    (["optim.lr=0"], r"optim.lr: must be > 0 \(got 0.0\)"),
    (["optim.lr=-0.1"], r"optim.lr: must be > 0"),
    (["optim.name=adamx"], r"optim.name: unknown 'adamx' \(allowed: .*adam, .*sgd"),
    (["model.name=resnet1000"], r"model.name: unknown 'resnet1000' \(allowed: resnet, resnet18"),
    (["data.flip_p=1.5"], r"data.flip_p: must be a probability in \[0, 1\]"),
    (["train.num_workers=3"], r"train.global_batch_size: must be divisible by train.num_workers=3"),
    (["model.blocks=[1,1]", "model.widths=[8]"], r"model.widths: needs one width per stage"),
    (["tune.max_epochs=100"], r"tune.max_epochs: must be in \[1, train.epochs=30\]"),
    (["tune.dashboard=false", "train.num_workers=2"],
     r"tune.dashboard: false needs one-rank trials, not train.num_workers 2: .*state API \(got False\)"),
    # Inside the search space: a searched rank count, and one in a variant, that gives a DDP trial.
    (["tune.dashboard=false", "tune.search_space={train.num_workers: {grid: [1, 2]}}"],
     r"tune.search_space.train.num_workers: value 2: tune.dashboard: false needs one-rank trials"),
    (["tune.dashboard=false", "tune.search_space={variants: {grid: [{optim.lr: 0.1}, {train.num_workers: 4}]}}"],
     r"tune.search_space.variants: value .*tune.dashboard: false needs one-rank trials, not train.num_workers 4"),
    # Values each fine alone that clash in one trial: the trial Tune made ended the study mid-run (exit 2), and
    # every --resume again.
    (["tune.search_space={data.mixup_p: {grid: [0, 0.6]}, data.cutmix_p: {grid: [0, 0.6]}}"],
     r"tune.search_space: the trial with data.mixup_p=0.6, data.cutmix_p=0.6: data.cutmix_p: must be <= 1 - "),
    (["model.name=resnet", "tune.search_space={model.blocks: {grid: [[1, 1], [1, 1, 1]]}, "
      "model.widths: {grid: [[8, 16], [8, 16, 32]]}}"],
     r"the trial with model.blocks=\[1, 1\], model.widths=\[8, 16, 32\]: model.widths: needs one width per stage"),
    (["train.global_batch_size=100", "tune.search_space={train.num_workers: {grid: [1, 2]}, "
      "train.global_batch_size: {grid: [100, 125]}}"],
     r"the trial with train.num_workers=2, train.global_batch_size=125: .* divisible by train.num_workers=2"),
    # A range of an integer field: both ends pass, every draw between is a fraction the trial refused.
    (["tune.search_space={train.global_batch_size: {uniform: [64, 128]}}"],
     r"tune.search_space.train.global_batch_size: uniform draws fractions and train.global_batch_size is an "
     r"integer: use randint"),
    # Built only when the model was made (a traceback): the entry's own widths or blocks, GroupNorm's groups.
    (["model.blocks=[1, 1]"], r"model.blocks: 2 stages, but resnet18's own widths has 4 \(\[64, 128, 256, 512\]\): "
                              r"set model.widths too"),
    (["model.widths=[16, 32, 64]", "model.max_params=1000000"], r"model.widths: 3 stages, but resnet18's own blocks"),
    (["model.name=resnet", "model.norm=group", "model.blocks=[1, 1, 1]", "model.widths=[12, 24, 48]"],
     r"model.widths: with model.norm group every layer's channels must split into 8 equal groups: 12 does not"),
    (["data.split_seed=-1"], r"data.split_seed: must be >= 0"),
    (["train.seed=-1"], r"train.seed: must be >= 0"),
    (["model.num_classes=5"], r"model.num_classes: must be >= 10: CIFAR-10's labels are 0-9"),
    # A loss ranked by max put the worst trial first, and ASHA kept the worst.
    (["tune.metric=val_loss"], r"tune.mode: val_loss is best at its lowest: set tune.mode min \(got 'max'\)"),
    (["tune.mode=min"], r"tune.mode: val_acc is best at its highest: set tune.mode max"),
    # No validation split: val_acc 0.0 every epoch, the first epoch taken for the best.
    (["data.val_size=0"], r"data.val_size: must be >= 1: trials, epochs and ASHA's cuts are chosen on the valid"),
    (["data.val_size=null", "data.val_fraction=0"], r"data.val_fraction: must be in \(0, 1\)"),
    # Each sample of a pure grid is the whole grid again: a searched seed grid times num_samples ran copies.
    (["tune.num_samples=3", "tune.search_space={train.seed: {grid: [0, 1]}}"],
     r"tune.num_samples: with train.seed searched by a grid, each of the 3 samples is the whole grid again"),
])
def test_bad_values_name_the_key(sets, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, sets)
    assert "\n" not in str(info.value)


def test_no_dashboard_is_taken_where_every_trial_has_one_rank():
    cfg = load_config(None, ["tune.dashboard=false", "tune.search_space={optim.lr: {grid: [0.1, 0.01]}}"])
    assert cfg.tune.dashboard is False and cfg.train.num_workers == 1
    assert load_config(None, ["train.num_workers=2"]).tune.dashboard is True  # the default: DDP trials need it


def test_search_space_values_are_validated_before_any_work(tmp_path):
    path = write(tmp_path, "tune:\n  search_space:\n    optim.name: {grid: [sgd, adamz]}\n")
    with pytest.raises(ConfigError, match=r"tune.search_space.optim.name: value 'adamz': optim.name: unknown 'adamz'"):
        load_config(path)
    path = write(tmp_path, "tune:\n  search_space:\n    optim.lr: {loguniform: [0.1, 0.01]}\n")
    with pytest.raises(ConfigError, match="low < high"):
        load_config(path)
    path = write(tmp_path, "tune:\n  search_space:\n    optim.lr: [0.1, 0.01]\n")
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(path)


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def test_a_yaml_error_says_what_is_wrong_and_where(tmp_path):
    """The first line of PyYAML's message alone was the parser's context ("while parsing a flow sequence") or the
    problem without its place: a user hunting a stray space in a long study file got neither line nor column."""
    with pytest.raises(ConfigError) as bad_indent:
        load_config(write(tmp_path, "train:\n  epochs: 3\n   global_batch_size: 64\n"))
    assert str(bad_indent.value).endswith("is not valid YAML: line 3, column 21: mapping values are not allowed here")
    with pytest.raises(ConfigError) as unclosed:
        load_config(write(tmp_path, "train:\n  epochs: [3\n"))
    assert str(unclosed.value).endswith("is not valid YAML: line 3, column 1: expected ',' or ']', but got "
                                        "'<stream end>' (while parsing a flow sequence from line 2, column 11)")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_smoke_test_shrinks_the_default_study():
    cfg = load_config(smoke_test=True)
    assert cfg.model.name == SMOKE_OVERRIDES["model"]["name"]
    assert cfg.train.num_workers == 2
    # optimizers x batch sizes, cut to two values each: 4 trials.
    assert len(cfg.tune.search_space["optim"]["grid"]) == 2
    assert cfg.tune.search_space["train.global_batch_size"]["grid"] == [128, 256]
    assert search_keys(cfg.tune.search_space) == ["optim.name", "optim.lr", "optim.weight_decay",
                                                  "train.global_batch_size"]


def test_trial_config_applies_sampled_values_and_drops_the_search_space():
    base = load_config().to_dict()
    cfg = trial_config(base, {"optim": {"name": "adam", "lr": 0.001}, "train.global_batch_size": 128})
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.global_batch_size) == ("adam", 0.001, 128)
    assert cfg.optim.momentum == Config().optim.momentum
    assert cfg.tune.search_space == {}
    round_trip = config_from_dict(cfg.to_dict())
    assert round_trip == cfg


NO_SEARCH = "tune.search_space={}"
PUBLISHED = ("published:\n  - where: {optim.name: sgd, train.global_batch_size: 128}\n    value: 93.0\n"
             "    metric: test_acc\n    source: the paper, table 2\n")


def test_published_figures_are_metadata_kept_in_the_config_but_never_searched(tmp_path):
    cfg = load_config(write(tmp_path, PUBLISHED))
    run = cfg.published[0].pop("run")  # the study file's run, pinned (validation.pin_published_runs)
    assert cfg.published == [{"where": {"optim.name": "sgd", "train.global_batch_size": 128}, "value": 93.0,
                              "metric": "test_acc", "source": "the paper, table 2"}]
    assert (run["model.name"], run["train.epochs"], run["data.train_subset"]) == ("resnet18", 30, None)
    assert "optim.name" not in run and "train.global_batch_size" not in run  # where names them
    assert load_config(write(tmp_path, PUBLISHED), smoke_test=True).published[0]["run"] == run  # the file's, still
    cfg.published[0]["run"] = run
    assert config_from_dict(cfg.to_dict()).published == cfg.published  # saved in config.yaml, read back
    assert "published" not in search_keys(cfg.tune.search_space)
    assert "published" in field_docs()
    with pytest.raises(ConfigError, match="tune.search_space.published"):
        load_config(None, ["tune.search_space={published: {grid: [[], []]}}"])


@pytest.mark.parametrize("change, message", [
    ("optim.name: sgd", None),
    ("optim.nme: sgd", "published[0].where: unknown key 'optim.nme'"),
    ("train.global_batch_size: many", "published[0].where: train.global_batch_size: expected an integer"),
    ("value: 193", "published[0].value: must be an accuracy in percent, in [0, 100]"),
    ("metric: train_acc", "published[0].metric: must be one of test_acc, val_acc"),
])
def test_published_entries_are_checked(tmp_path, change, message):
    key, value = change.split(": ")
    text = PUBLISHED
    if key in ("value", "metric"):
        text = text.replace({"value": "value: 93.0", "metric": "metric: test_acc"}[key], change)
    else:
        text = text.replace("optim.name: sgd", change) if key.startswith("optim") else \
            text.replace("train.global_batch_size: 128", change)
    if message is None:
        load_config(write(tmp_path, text))
        return
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_check_resources_names_the_key_and_counts_the_driver_on_a_cluster():
    from ray_cifar.validation import check_resources

    cfg = load_config(None, ["train.num_workers=2", "tune.trial_driver_cpus=0.25", NO_SEARCH])
    check_resources(cfg, cpus=2.25, gpus=0)
    with pytest.raises(ConfigError, match=r"^train.num_workers: a trial needs 2 rank\(s\) x 1 CPUs \+ "
                                          r"tune.trial_driver_cpus=0.25 = 2.25 CPUs, more than the 2 there are"):
        check_resources(cfg, cpus=2, gpus=0)
    check_resources(cfg, cpus=2, gpus=0, count_driver=False)  # a local Ray: the ranks alone against the cores
    cfg.train.cpus_per_worker = 4.0
    with pytest.raises(ConfigError, match="^train.cpus_per_worker: "):  # the ranks fit at 1 CPU each: name the CPUs
        check_resources(cfg, cpus=4, gpus=0)
    cfg.train.cpus_per_worker = 1.0
    with pytest.raises(ConfigError, match=r"^train.num_workers: a trial needs 2 rank\(s\) x train.gpus_per_worker=1 = "
                                          r"2 GPUs, more than the 1 there are"):
        check_resources(cfg, cpus=8, gpus=1)  # use_gpu null: GPUs are used where there are any
    cfg.train.use_gpu = True
    with pytest.raises(ConfigError, match="^train.use_gpu: true but there is no GPU"):
        check_resources(cfg, cpus=8, gpus=0)
    check_resources(cfg, cpus=8, gpus=2)


def test_check_against_data_covers_every_trial_of_the_search_space():
    from ray_cifar.validation import check_against_data

    cfg = load_config(None, ["data.val_size=100", "train.global_batch_size=128",
                             "tune.search_space={data.train_subset: {grid: [400, 300]}, "
                             "train.global_batch_size: {grid: [128, 256]}}"])
    check_against_data(cfg, 1000)
    with pytest.raises(ConfigError, match=r"^tune.search_space: the trial with data.train_subset=400, "
                                          r"train.global_batch_size=256: train.global_batch_size: larger than the 200 "
                                          r"train images \(300 minus 100 for validation, data.train_subset=400\)"):
        check_against_data(cfg, 300)
    check_against_data(cfg, 300, searched=False)  # the fixed values alone are fine
    with pytest.raises(ConfigError, match=r"^train.global_batch_size: larger than the 100 train images "
                                          r"\(200 minus 100 for validation\) \(got 128\)"):
        check_against_data(cfg, 200, searched=False)


@pytest.mark.parametrize("value, than, mode, expected", [
    (0.5, 0.4, "max", True), (0.4, 0.5, "max", False), (0.4, 0.5, "min", True), (0.5, 0.4, "min", False),
    (0.5, 0.5, "max", False),  # a tie keeps the earlier best
    (0.1, None, "min", True), (None, 0.1, "max", False),
    (float("nan"), None, "max", False), (float("inf"), 0.1, "max", False), (float("-inf"), 0.1, "min", False),
])
def test_improves_is_what_best_means_under_tune_mode(value, than, mode, expected):
    from ray_cifar.config import improves

    assert improves(value, than, mode) is expected


def test_exponents_without_a_dot_are_numbers_everywhere_a_study_file_has_them(tmp_path):
    """YAML 1.1 (PyYAML) reads 5e-4 as a string: a float field took it, but `loguniform: [1e-4, 1e-1]`, the usual
    way to write an lr range, was refused as not numbers, and a published `where` of 5e-4 never matched a trial."""
    path = write(tmp_path, "model: {max_params: 2e7}\noptim: {weight_decay: 5e-4}\n"
                           "tune:\n  search_space:\n    optim.lr: {loguniform: [1e-4, 1e-1]}\n"
                           "    optim.weight_decay: {grid: [5e-4, 1E-3]}\n"
                           "published:\n  - {where: {optim.weight_decay: 5e-4}, value: 90.0, metric: test_acc, "
                           "source: x}\n")
    cfg = load_config(path, ["optim.eps=1e-8"])
    assert cfg.tune.search_space == {"optim.lr": {"loguniform": [1e-4, 0.1]},
                                     "optim.weight_decay": {"grid": [5e-4, 1e-3]}}
    assert cfg.published[0]["where"] == {"optim.weight_decay": 5e-4} and cfg.optim.eps == 1e-8
    assert cfg.model.max_params == 20_000_000 and isinstance(cfg.model.max_params, int)  # a count written as 2e7
    with pytest.raises(ConfigError, match=r"optim.weight_decay: expected a finite number, got inf"):
        load_config(None, ["optim.weight_decay=.inf"])
    with pytest.raises(ConfigError, match=r"data.erasing_ratio: expected a finite number"):
        load_config(None, ["data.erasing_ratio=[0.3, .inf]"])


def test_a_key_given_twice_in_a_study_file_is_an_error_naming_both_lines(tmp_path):
    """A second `train:` section replaced the first whole: its epochs went back to the default without a word."""
    path = write(tmp_path, "train:\n  epochs: 50\noptim:\n  lr: 0.1\ntrain:\n  global_batch_size: 128\n")
    with pytest.raises(ConfigError, match=r"study.yaml is not valid YAML: line 5, column 1: found 'train' twice "
                                          r"\(first on line 1\)") as info:
        load_config(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"line 1, column 18: found 'lr' twice"):
        load_config(write(tmp_path, "optim: {lr: 0.1, lr: 0.2}\n"))
    # YAML's merge key is not a repeat: the mapping's own keys override the merged ones.
    cfg = load_config(write(tmp_path, "optim:\n  <<: {lr: 0.05, momentum: 0.8}\n  momentum: 0.7\n"))
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.05, 0.7)


def test_searched_blocks_and_widths_are_checked_together_not_each_against_the_models_own():
    """Each searched value is first checked against the fixed config alone: blocks [1, 1] against resnet18's own
    four widths fails there, but every trial pairs it with a searched two-stage widths."""
    space = "{model.blocks: {grid: [[1, 1], [2, 2]]}, model.widths: {grid: [[8, 16], [16, 32]]}}"
    cfg = load_config(None, [f"tune.search_space={space}"])
    assert len(cfg.tune.search_space) == 2
    with pytest.raises(ConfigError, match=r"tune.search_space.model.blocks: value \[1, 1, 1\]: model.blocks: 3 stages"):
        load_config(None, ["tune.search_space={model.blocks: {grid: [[1, 1, 1]]}, model.widths: {grid: [[8, 16]]}}"])


def test_a_study_with_nothing_to_search_is_refused_where_its_search_needs_something():
    """PBT with an empty space was refused only once Ray had started (its --resume line printed, its folder then
    removed); Optuna drew tune.num_samples identical trials. A trial's own config, its space emptied, stays valid."""
    with pytest.raises(ConfigError, match="tune.scheduler: pbt needs a searched field it can perturb"):
        load_config(None, ["tune.scheduler=pbt", "tune.search_space={}", "tune.num_samples=2"])
    with pytest.raises(ConfigError, match="tune.search: optuna draws trials from tune.search_space, which is empty"):
        load_config(None, ["tune.search=optuna", "tune.search_space={}", "tune.num_samples=4"])
    trial = load_config(None, ["tune.scheduler=pbt", "tune.search_space={optim.lr: {loguniform: [0.01, 0.1]}}"])
    trial.tune.search_space = {}
    config_from_dict(trial.to_dict())  # a PBT trial's own config
    load_config(None, ["tune.search_space={}", "tune.num_samples=3"])  # a grid of nothing: seed replicates


def test_a_key_misspelt_in_an_extended_file_or_a_set_names_where_it_is(tmp_path):
    """`extends: parent.yaml` with a typo in the parent said "unknown key 'train.epochz'" with no file: the user ran
    the child and looked there."""
    (tmp_path / "parent.yaml").write_text("train: {epochz: 2}\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\ntrain: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"^.*parent\.yaml: unknown key 'train\.epochz'"):
        load_config(str(tmp_path / "child.yaml"))
    with pytest.raises(ConfigError, match=r"^--set train\.epochz=3: unknown key 'train\.epochz'"):
        load_config(None, ["train.epochz=3"])


def test_a_value_a_set_gave_that_validation_refuses_names_the_set(tmp_path):
    """A search space written by a --set and refused said "tune.search_space.optim.lr: expected one of {grid, ...}",
    as if the study file held it. The --set of the field, of a section above it or of a field inside it is named;
    a refusal of the study file's own value names none."""
    space = "tune.search_space={optim.lr: {grdi: [0.1]}}"
    with pytest.raises(ConfigError, match=r"^--set tune\.search_space=\{optim\.lr: \{grdi: \[0\.1\]\}\}: "
                                          r"tune\.search_space\.optim\.lr: expected one of"):
        load_config(None, ["train.epochs=3", space])
    with pytest.raises(ConfigError, match=r"^--set optim\.lr=-1: optim\.lr: must be > 0"):
        load_config(None, ["optim.lr=-1", "train.epochs=3"])
    (tmp_path / "study.yaml").write_text("optim: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0"):  # the file's, a --set of another field
        load_config(str(tmp_path / "study.yaml"), ["train.epochs=3"])
