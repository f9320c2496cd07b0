"""The torch and DALI AutoAugment paths mean the same thing: for every op of the CIFAR-10 policy and
every magnitude bin, the parameter the torch path uses equals the one DALI's own augmentation
objects compute (their mag_range, sign rule and mag_to_param), not constants copied from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from ray_cifar.data import augment as A  # noqa: E402
from ray_cifar.data.dali import dali_cifar10_policy, policy_table  # noqa: E402

POLICY = dali_cifar10_policy()
DALI_OPS = {}  # op name (as the torch policy spells it) -> DALI's augmentation object in the policy
for dali_sub_policy, sub_policy in zip(POLICY.sub_policies, policy_table(POLICY)):
    for (aug, _, _), (name, _, _) in zip(dali_sub_policy, sub_policy):
        DALI_OPS[name] = aug
BINS = range(POLICY.num_magnitude_bins)
# DALI's warp parameter is an [x, y] pair: the op's axis holds the magnitude.
AXIS = {"shear_x": 0, "shear_y": 1, "translate_x": 0, "translate_y": 1}


def dali_param(name: str, bin_: int) -> np.ndarray:
    aug = DALI_OPS[name]
    magnitude = aug._get_magnitudes(POLICY.num_magnitude_bins)[bin_]
    return aug._map_mag_to_param(magnitude)


def torch_sharpness_kernel(factor: float) -> np.ndarray:
    """The 3x3 kernel the torch path applies, read off its response to a unit impulse."""
    impulse = torch.zeros(1, 5, 5, 3)
    impulse[0, 2, 2] = 1.0
    response = A._sharpen(impulse, torch.tensor([factor]))[0, 1:4, 1:4, 0]
    return response.flip(0, 1).numpy()  # correlation with a symmetric kernel: flipping only documents it


def torch_posterize_mask(bits: float) -> int:
    return int(A._posterize(torch.full((1, 1, 1, 1), 255, dtype=torch.uint8), torch.tensor([bits])).item())


def test_both_paths_run_the_same_policy_and_bins():
    assert policy_table(POLICY) == A.CIFAR10_POLICY
    assert POLICY.num_magnitude_bins == A.AUTOAUG_BINS


@pytest.mark.parametrize("name", sorted(DALI_OPS))
def test_each_op_has_the_same_sign_rule_and_parameterless_ops_agree(name):
    aug = DALI_OPS[name]
    assert aug.randomly_negate == A.AUTOAUG_RANGES.get(name, (None, False))[1]
    assert (aug.mag_range is None) == (name not in A.AUTOAUG_RANGES)


@pytest.mark.parametrize("name", sorted(n for n in DALI_OPS if n in A.AUTOAUG_RANGES))
@pytest.mark.parametrize("bin_", BINS)
def test_each_op_has_the_same_parameter_at_each_magnitude_bin(name, bin_):
    ours, theirs = A.autoaug_magnitude(name, bin_), dali_param(name, bin_)
    if name in AXIS:
        expected = np.zeros(2)
        expected[AXIS[name]] = ours
        np.testing.assert_allclose(theirs, expected, rtol=1e-6, atol=1e-6)
    elif name == "sharpness":
        np.testing.assert_allclose(torch_sharpness_kernel(ours), theirs, atol=1e-6)
    elif name == "posterize":
        assert torch_posterize_mask(ours) == int(theirs)
    else:  # rotate (degrees), brightness/color/contrast (enhance factor), solarize (threshold)
        assert ours == pytest.approx(float(theirs), rel=1e-6, abs=1e-5)


def test_solarize_inverts_pixels_at_or_above_the_threshold_as_dali():
    """DALI: `mask_unchanged = data < threshold`; the rest becomes 255 - data."""
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    codes = torch.tensor([A.AUTOAUG_OPS.index("solarize")])
    for bin_ in (2, 8):
        threshold = float(dali_param("solarize", bin_))
        out = A._apply_autoaug_op(pixels, codes, torch.tensor([A.autoaug_magnitude("solarize", bin_)]))
        expected = torch.where(pixels.float() < threshold, pixels, 255 - pixels)
        assert torch.equal(out, expected)
