"""The torch batch-tensor augmentations: statistics per augmentation, determinism, mixing, config errors.

Rates are checked within about 4 standard deviations of their binomial noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from ray_cifar.data import augment as A
from ray_cifar.config import ConfigError
from ray_cifar.validation import load_config
from ray_cifar.data.loader import Split, TrainLoader


def data_cfg(*sets: str):
    return load_config(None, ["data.crop_padding=0", "data.flip_p=0", *[f"data.{s}" for s in sets]]).data


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coordinate_images(n: int) -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = image id % 251 (0 is left for fills)."""
    rows = torch.arange(32).view(1, 32, 1).expand(n, 32, 32) + 1
    cols = torch.arange(32).view(1, 1, 32).expand(n, 32, 32) + 1
    ids = (torch.arange(n) % 251).view(n, 1, 1).expand(n, 32, 32) + 1
    return torch.stack([rows, cols, ids], -1).to(torch.uint8)


def low_contrast_images(n: int, seed: int = 0) -> torch.Tensor:
    """Pixels in [40, 200]: every AutoAugment op but solarize at threshold > 200 changes them."""
    return torch.randint(40, 201, (n, 32, 32, 3), generator=gen(seed), dtype=torch.uint8)


def assert_rate(observed: float, expected: float, n: int) -> None:
    tolerance = 4 * math.sqrt(max(expected * (1 - expected), 1e-4) / n) + 1e-3
    assert abs(observed - expected) <= tolerance, f"rate {observed:.4f}, expected {expected:.4f} ± {tolerance:.4f}"


# ---------------------------------------------------------------------------
# Crop and flip


def crop_offsets(out: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) in {0..2*padding} from the centre pixel's coordinates (never a fill pixel)."""
    return out[:, 16, 16, 0].long() - 17 + padding, out[:, 16, 16, 1].long() - 17 + padding


def test_crop_offsets_uniform_over_the_padding_range_and_fill():
    n, pad = 9000, 4
    out = A.random_crop(coordinate_images(n), pad, gen(), fill=255)  # 255: no image pixel has it
    dy, dx = crop_offsets(out, pad)
    for offsets in (dy, dx):
        counts = torch.bincount(offsets, minlength=2 * pad + 1)
        assert counts.numel() == 2 * pad + 1 and counts.min() > 0
        assert_rate(counts.min().item() / n, 1 / (2 * pad + 1), n)
        assert_rate(counts.max().item() / n, 1 / (2 * pad + 1), n)
    top_padded = dy == 0  # shifted down by the full padding: the first 4 rows are fill
    assert (out[top_padded, :pad] == 255).all() and (out[dy >= pad][:, :pad, 16] != 255).all()


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_flip_rate_is_p(p):
    n = 4000
    images = coordinate_images(n)
    out = A.random_flip(images, p, gen())
    flipped = (out == images.flip(2)).flatten(1).all(1)
    assert ((out == images).flatten(1).all(1) | flipped).all()
    assert_rate(flipped.float().mean().item(), p, n)


# ---------------------------------------------------------------------------
# Erasing and cutout


def erased_boxes(out: torch.Tensor, filled: torch.Tensor):
    """Per image: erased pixel count and its bounding box (h, w); checks each erased region is a rectangle."""
    mask = filled.all(-1)
    count = mask.flatten(1).sum(1)
    rows, cols = mask.any(2), mask.any(1)
    h, w = rows.sum(1), cols.sum(1)
    assert torch.equal(count, h * w), "an erased region is not a rectangle"
    return count, h, w


def test_random_erasing_rate_area_ratio_and_fill():
    n = 4000
    cfg = data_cfg("erasing_p=0.6", "erasing_scale=[0.05,0.2]", "erasing_ratio=[0.5,2.0]", "erasing_fill=mean")
    images = torch.full((n, 32, 32, 3), 255, dtype=torch.uint8)
    out = A.random_erasing(images, cfg, gen())
    mean = torch.tensor([round(m * 255) for m in A.MEAN], dtype=torch.uint8)
    count, h, w = erased_boxes(out, out == mean)
    erased = count > 0
    assert_rate(erased.float().mean().item(), 0.6, n)
    area = count[erased].float() / 1024
    # Rounding h and w to whole pixels moves the area a little outside the drawn range.
    assert area.min() >= 0.05 * 0.8 and area.max() <= 0.2 * 1.2
    assert area.mean().item() == pytest.approx(0.125, abs=0.01)
    log_ratio = torch.log(h[erased].float() / w[erased].float())
    assert log_ratio.min() >= math.log(0.5) - 0.3 and log_ratio.max() <= math.log(2.0) + 0.3
    assert abs(log_ratio.mean().item()) < 0.05  # log-uniform over a symmetric range


def test_random_erasing_random_fill_is_uniform_bytes():
    cfg = data_cfg("erasing_p=1", "erasing_scale=[0.3,0.3]", "erasing_fill=random")
    images = torch.full((500, 32, 32, 3), 255, dtype=torch.uint8)
    out = A.random_erasing(images, cfg, gen()).float()
    values = out[out != 255]
    assert values.numel() > 500 * 300 * 0.9 * 0.9  # about 0.3 of every image, all three channels
    assert values.mean().item() == pytest.approx(127, abs=2) and values.std().item() == pytest.approx(73.6, abs=2)


def test_cutout_squares_have_the_given_size_clipped_at_the_border():
    n, size = 4000, 8
    images = torch.full((n, 32, 32, 3), 255, dtype=torch.uint8)
    out = A.cutout(images, size, 0.7, gen())
    count, h, w = erased_boxes(out, out == 0)
    cut = count > 0
    assert_rate(cut.float().mean().item(), 0.7, n)
    assert h.max() == size and w.max() == size and h[cut].min() >= size // 2
    full = (h == size) & (w == size)
    # The centre is uniform over all 32 rows/cols; 25 of them keep the whole square inside.
    assert_rate(full.float().mean().item(), 0.7 * (25 / 32) ** 2, n)


# ---------------------------------------------------------------------------
# Color jitter and rotation


def test_brightness_factor_spans_its_range():
    images = low_contrast_images(2000)
    out = A.color_jitter(images, 0.4, 0.0, 0.0, 0.0, gen())
    ratio = out.float().mean((1, 2, 3)) / images.float().mean((1, 2, 3))
    assert ratio.min() >= 0.6 - 0.01 and ratio.max() <= 1.4 + 0.01
    assert ratio.min() < 0.62 and ratio.max() > 1.38 and ratio.mean().item() == pytest.approx(1.0, abs=0.02)


def test_hue_and_saturation_keep_luma_and_contrast_keeps_mean_gray():
    images = low_contrast_images(500)
    luma = A._gray(images.float())
    hue = A.color_jitter(images, 0.0, 0.0, 0.5, 0.5, gen())
    assert not torch.equal(hue, images)
    assert (A._gray(hue.float()) - luma).abs().mean() < 1.0  # only rounding and clipping
    contrast = A.color_jitter(images, 0.0, 0.5, 0.0, 0.0, gen())
    assert (A._gray(contrast.float()).mean((1, 2, 3)) - luma.mean((1, 2, 3))).abs().max() < 1.0
    assert (contrast.float().std((1, 2, 3)) / images.float().std((1, 2, 3))).max() > 1.3


def test_rotation_matrix_turns_90_degrees_exactly_and_random_rotation_fills_corners():
    images = coordinate_images(4)
    quarter = A._affine(images, A._rotation_inverse(torch.full((4,), 90.0), 32, 32), fill=0.0)
    assert torch.equal(quarter, torch.rot90(images, 1, (1, 2)))  # counter-clockwise on screen
    out = A.random_rotation(coordinate_images(1000), 30.0, gen())
    corner_filled = (out[:, 0, 0] == 0).all(-1).float().mean().item()
    assert 0.3 < corner_filled < 0.9  # rotations beyond ~5 degrees move the corner out of the image
    assert torch.equal(A.random_rotation(images, 0.0, gen()), images)


# ---------------------------------------------------------------------------
# AutoAugment


def expected_unchanged_rate(policy, identity_ops) -> float:
    """P(an image comes out unchanged): mean over sub-policies of prod(1 - p) over ops that change it."""
    rates = [math.prod(1 - p for name, p, b in sub if (name, b) not in identity_ops) for sub in policy]
    return sum(rates) / len(rates)


# On pixels in [40, 200]: sharpness at bin 5 is factor 1.0, solarize at bin 8 has threshold 204.8.
IDENTITY_ON_LOW_CONTRAST = {("sharpness", 5), ("solarize", 8)}


def test_autoaugment_outputs_are_outcomes_of_the_drawn_cifar10_sub_policy():
    n = 600
    images = low_contrast_images(n)
    out, sub_policy = A.autoaugment(images, "cifar10", gen(), return_sub_policy=True)
    assert_rate((torch.bincount(sub_policy, minlength=25) > 0).float().mean().item(), 1.0, 25)
    op, prob, mag, signed = A._policy_tables("cifar10", "cpu")
    matched = torch.zeros(n, dtype=torch.bool)
    for run0 in (False, True):
        for run1 in (False, True):
            for sign0 in (1.0, -1.0):
                for sign1 in (1.0, -1.0):
                    x = images
                    for k, run, sign in ((0, run0, sign0), (1, run1, sign1)):
                        code = op[sub_policy, k] if run else torch.zeros(n, dtype=torch.long)
                        x = A._apply_autoaug_op(x, code, mag[sub_policy, k] * sign)
                    matched |= (x == out).flatten(1).all(1)
    assert matched.all(), f"{(~matched).sum()} outputs are no outcome of their sub-policy"


def ops_with_magnitudes(n: int = 500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, an AutoAugment op each and its magnitude."""
    op = torch.randint(0, len(A.AUTOAUG_OPS), (n,), generator=gen())
    return low_contrast_images(n, seed=3), op, torch.rand(n, generator=gen()) * 1.8 + 0.1


def test_whole_batch_and_per_group_op_application_agree():
    images, op, magnitude = ops_with_magnitudes()
    grouped = A._apply_autoaug_op(images, op, magnitude, sync_free=False)
    assert torch.equal(grouped, A._apply_autoaug_op(images, op, magnitude, sync_free=True))
    assert (grouped != images).flatten(1).any(1).float().mean() > 0.8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_autoaugment_op_on_cuda_gives_the_cpus_pixels():
    # On CUDA the ops run sync-free (every op on the whole batch, selected per image), a branch the CPU runs only
    # when forced (above). The same ops and magnitudes, so the same pixels but for float rounding: here (CPU
    # magnitudes 1e-6 apart) no pixel moved by more than 1. TF32 is off for it: its matmuls move the sampling grid
    # by ~0.02 px, a few grey levels on these noisy images (engine.set_fast_paths turns it on in the process).
    images, op, magnitude = ops_with_magnitudes()
    cpu = A._apply_autoaug_op(images, op, magnitude, sync_free=False)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        cuda = A._apply_autoaug_op(images.cuda(), op.cuda(), magnitude.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    off = (cuda.int() - cpu.int()).abs()
    assert (off > 1).float().mean().item() < 1e-3, f"{(off > 1).sum().item()} pixels differ by more than 1"
    assert (off > 1).flatten(1).any(1).float().mean().item() < 0.05  # and in few images


def test_autoaugment_changes_images_at_the_policy_rate():
    n = 3000
    images = low_contrast_images(n, seed=1)
    out = A.autoaugment(images, "cifar10", gen())
    unchanged = (out == images).flatten(1).all(1).float().mean().item()
    assert_rate(unchanged, expected_unchanged_rate(A.CIFAR10_POLICY, IDENTITY_ON_LOW_CONTRAST), n)


def test_equalize_flattens_the_histogram():
    images = low_contrast_images(50)
    out = A._equalize(images)
    assert out.amin((1, 2)).max() <= 2 and out.amax((1, 2)).min() == 255  # stretched to the full range
    assert out.float().mean().item() == pytest.approx(127.5, abs=3)


# ---------------------------------------------------------------------------
# The whole chain: registry order, determinism


FULL = ["crop_padding=4", "flip_p=0.5", "autoaugment=cifar10", "jitter_brightness=0.2", "jitter_contrast=0.2",
        "jitter_saturation=0.2", "jitter_hue=0.05", "rotation_degrees=10", "erasing_p=0.5", "cutout_size=8",
        "cutout_p=0.5"]


def test_registry_lists_every_augmentation_in_order_and_config_fields_exist():
    assert list(A.AUGMENTATIONS) == ["crop", "flip", "autoaugment", "color_jitter", "rotation", "erasing", "cutout"]
    cfg = data_cfg(*FULL)
    assert A.active_augmentations(cfg) == list(A.AUGMENTATIONS)
    assert A.active_augmentations(data_cfg()) == []
    for aug in A.AUGMENTATIONS.values():
        assert all(hasattr(cfg, f) for f in aug.fields), aug.name


def test_same_seed_same_batches_other_seed_or_epoch_other_batches():
    images = low_contrast_images(400)
    split = Split(images, torch.arange(400) % 10)
    cfg = data_cfg(*FULL)

    def batches(seed, epoch):
        return [x for x, _ in TrainLoader(split, cfg, 100, 0, 2, seed).epoch(epoch)]

    first, again = batches(5, 0), batches(5, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], batches(6, 0)[0])
    assert not torch.equal(first[0], batches(5, 1)[0])


# ---------------------------------------------------------------------------
# Mixup and cutmix


def test_mixup_and_cutmix_mix_images_and_targets_consistently():
    cfg = data_cfg("mixup_p=0.4", "cutmix_p=0.4")
    mixer = A.BatchMixer(cfg, num_classes=10, seed=0)
    labels = torch.arange(8) % 10
    kinds = {"mixup": 0, "cutmix": 0, "none": 0}
    trials = 1000
    for _ in range(trials):
        # Image i's values in [i/8, (i+1)/8): no pixel pasted from another image equals the one it covers. With
        # plain torch.rand, one equal pair in the 1,000 x ~1,200 pasted pixels (a 1 in 2^24 draw each: about 7% of runs)
        # counted a pasted pixel as its own and failed the box's area check by one pixel (seen in CI).
        images = (torch.rand(8, 3, 32, 32) + torch.arange(8).view(8, 1, 1, 1)) / 8
        mixed, targets = mixer(images, labels)
        assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
        lam = targets[0, labels[0]].item()  # the weight of image 0's own class (labels are distinct)
        from_other = (mixed != images).flatten(1).float().mean(1)[0].item()
        if torch.equal(mixed, images):
            kinds["none"] += 1
            assert lam == 1.0
        elif torch.allclose(mixed, images * lam + images.flip(0) * (1 - lam), atol=1e-6) and from_other > 0.99:
            kinds["mixup"] += 1
        else:
            kinds["cutmix"] += 1  # the pasted box covers exactly 1 - lambda of the image
            assert from_other == pytest.approx(1 - lam, abs=1e-6)
    for kind, p in (("mixup", 0.4), ("cutmix", 0.4), ("none", 0.2)):
        assert_rate(kinds[kind] / trials, p, trials)


def test_train_epoch_accepts_soft_targets():
    from ray_cifar import engine
    from ray_cifar.models import create_model

    model = create_model("resnet", blocks=[1], widths=[8], stem_width=8, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)
    labels = torch.arange(16) % 10
    soft = torch.nn.functional.one_hot(labels, 10).float() * 0.7 + 0.03
    batches = [(torch.randn(16, 3, 32, 32), soft)]
    metrics = engine.train_epoch(model, batches, optimizer, scheduler, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                                 amp="fp32")
    assert metrics["train_images"] == 16 and 0.0 <= metrics["train_acc"] <= 1.0 and math.isfinite(metrics["train_loss"])


# ---------------------------------------------------------------------------
# Config errors name the key


@pytest.mark.parametrize("assignment, key", [
    ("data.flip_p=1.5", "data.flip_p"),
    ("data.erasing_p=-0.1", "data.erasing_p"),
    ("data.cutout_p=2", "data.cutout_p"),
    ("data.mixup_p=1.1", "data.mixup_p"),
    ("data.erasing_scale=[0.4,0.1]", "data.erasing_scale"),
    ("data.erasing_ratio=[3.0,0.3]", "data.erasing_ratio"),
    ("data.erasing_fill=blue", "data.erasing_fill"),
    ("data.autoaugment=imagenet", "data.autoaugment"),
    ("data.jitter_hue=0.7", "data.jitter_hue"),
    ("data.jitter_brightness=-1", "data.jitter_brightness"),
    ("data.rotation_degrees=400", "data.rotation_degrees"),
    ("data.cutout_size=40", "data.cutout_size"),
    ("data.crop_fill=300", "data.crop_fill"),
    ("data.mixup_alpha=0", "data.mixup_alpha"),
    ("data.pipeline=cuda", "data.pipeline"),
])
def test_bad_augmentation_parameters_are_config_errors_naming_the_key(assignment, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [assignment])
    message = str(e.value)
    assert message.startswith(f"--set {assignment}: {key}:") and "\n" not in message  # where, then what


def test_mixup_and_cutmix_probabilities_cannot_exceed_one_together():
    with pytest.raises(ConfigError, match=r"^--set data.cutmix_p=0.5: data.cutmix_p:"):
        load_config(None, ["data.mixup_p=0.7", "data.cutmix_p=0.5"])
    assert load_config(None, ["data.mixup_p=0.5", "data.cutmix_p=0.5"]).data.cutmix_p == 0.5


# ---------------------------------------------------------------------------
# data.pipeline=auto follows the committed benchmark


def test_auto_on_cpu_follows_the_committed_cpu_benchmark(monkeypatch):
    """The package ships ray_cifar/measurements/data_pipeline_cpu.json, and auto obeys it for each set."""
    import json
    import os

    from ray_cifar.data import pipelines as data

    path = os.path.join(data.BENCHMARK_RESULTS, "data_pipeline_cpu.json")
    assert os.path.exists(path), "the CPU benchmark results must be committed"
    measured = {(r["set"], r["path"]): r["images_per_second"] for r in json.load(open(path))["results"]}
    monkeypatch.setattr(data, "dali_available", lambda: True)
    cpu = torch.device("cpu")
    for set_name, cfg in (("crop+flip", data_cfg("crop_padding=4", "flip_p=0.5")), ("full", data_cfg(*FULL))):
        faster = "dali" if measured[(set_name, "dali-cpu")] >= measured[(set_name, "torch-batch")] else "torch"
        logs = []
        assert data.resolve_pipeline(cfg, cpu, logs.append) == faster
        assert "data_pipeline_cpu.json" in logs[-1]


def test_auto_pipeline_follows_the_measurement_of_the_matching_set(tmp_path, monkeypatch):
    import json

    from ray_cifar.data import pipelines as data

    monkeypatch.setattr(data, "dali_available", lambda: True)
    monkeypatch.setattr(data, "BENCHMARK_RESULTS", str(tmp_path))
    cpu = torch.device("cpu")
    crop_flip, full = data_cfg("crop_padding=4", "flip_p=0.5"), data_cfg(*FULL)
    logs = []
    assert data.resolve_pipeline(crop_flip, cpu, logs.append) == "dali" and "no benchmark" in logs[-1]
    results = [{"set": "crop+flip", "path": "torch-batch", "images_per_second": 900.0},
               {"set": "crop+flip", "path": "dali-cpu", "images_per_second": 800.0},
               {"set": "full", "path": "torch-batch", "images_per_second": 100.0},
               {"set": "full", "path": "dali-cpu", "images_per_second": 300.0}]
    (tmp_path / "data_pipeline_cpu.json").write_text(json.dumps({"device": "test cpu", "results": results}))
    assert data.resolve_pipeline(crop_flip, cpu, logs.append) == "torch" and "800" in logs[-1]
    assert data.resolve_pipeline(full, cpu, logs.append) == "dali" and "300" in logs[-1]
    crop_flip.pipeline = "dali"
    assert data.resolve_pipeline(crop_flip, cpu) == "dali"  # an explicit choice is kept
    monkeypatch.setattr(data, "dali_available", lambda: False)
    assert data.resolve_pipeline(full, cpu) == "torch"


def test_the_benchmark_auto_reads_is_package_data():
    """A non-editable `pip install .` must carry the measurement auto reads: it lives inside the package."""
    import glob
    import os

    import ray_cifar
    from ray_cifar.data import pipelines

    package = os.path.dirname(os.path.abspath(ray_cifar.__file__))
    assert os.path.commonpath([package, os.path.abspath(pipelines.BENCHMARK_RESULTS)]) == package
    shipped = glob.glob(os.path.join(pipelines.BENCHMARK_RESULTS, "*.json"))
    assert shipped, "no committed measurement inside the package"
    setup_py = open(os.path.join(os.path.dirname(package), "setup.py")).read()
    assert '"measurements/*.json"' in setup_py


def test_auto_pipeline_weighs_the_build_against_the_images_a_run_draws(tmp_path, monkeypatch):
    """DALI a little faster per image but slower to build: a short run takes the torch path, a long one DALI."""
    import json

    from ray_cifar.data import pipelines as data

    monkeypatch.setattr(data, "dali_available", lambda: True)
    monkeypatch.setattr(data, "BENCHMARK_RESULTS", str(tmp_path))
    results = [{"set": "crop+flip", "path": "torch-batch", "images_per_second": 40000.0, "build_seconds": 0.1},
               {"set": "crop+flip", "path": "dali-cpu", "images_per_second": 50000.0, "build_seconds": 2.0},
               {"set": "full", "path": "dali-cpu", "images_per_second": 6000.0, "build_seconds": 0.5}]
    (tmp_path / "data_pipeline_cpu.json").write_text(json.dumps({"device": "test cpu", "results": results}))
    crop_flip, cpu, logs = data_cfg("crop_padding=4", "flip_p=0.5"), torch.device("cpu"), []
    # 24,000 images: torch 0.1 + 0.6 s, DALI 2.0 (its slowest build: the first also imported it) + 0.48 s.
    assert data.resolve_pipeline(crop_flip, cpu, logs.append, images=24_000) == "torch"
    assert "24000 images" in logs[-1] and "build" in logs[-1]
    # 9,000,000 images (a 200-epoch run): torch 225 s, DALI 182 s.
    assert data.resolve_pipeline(crop_flip, cpu, logs.append, images=9_000_000) == "dali"
    assert data.resolve_pipeline(crop_flip, cpu, logs.append) == "dali"  # images unknown: throughput alone


def test_run_images_counts_what_one_rank_draws():
    from ray_cifar.data.pipelines import run_images
    from ray_cifar.validation import load_config

    assert run_images(load_config(None, ["train.epochs=6"]), 8000, 2) == 24_000
    assert run_images(load_config(None, ["train.max_steps=100", "train.global_batch_size=128"]), 8000, 2) == 6400
