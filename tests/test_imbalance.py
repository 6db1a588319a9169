"""Class imbalance, bias-free classifiers and deep linear networks (issue 14): the long-tailed
dataset option, the imbalance geometry metrics against closed-form cases, and the figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncrobust import data
from ncrobust.data import imbalance_counts

# --------------------------------------------------------------------------------------------
# the dataset option


@pytest.mark.parametrize(
    "n_max, C, profile, ratio, expected",
    [
        (100, 10, "step", 10, [100] * 5 + [10] * 5),
        (100, 10, "step", 1, [100] * 10),
        (100, 5, "step", 4, [100, 100, 100, 25, 25]),  # odd C: the last C // 2 are minorities
        (130, 10, "step", 100, [130] * 5 + [1] * 5),
        # floor(n_max * ratio ** (-c / (C - 1))): 100 * 10 ** (-1/9) = 77.4, ...
        (100, 10, "exponential", 10, [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]),
        (1000, 10, "exponential", 100, [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]),
        (60, 3, "exponential", 4, [60, 30, 15]),
        (60, 3, "exponential", 1, [60, 60, 60]),
    ],
)
def test_imbalance_counts(n_max, C, profile, ratio, expected):
    assert imbalance_counts(n_max, C, profile, ratio) == expected


def _digits(**options):
    return data.load("digits", seed=0, **options)


@pytest.fixture(scope="module")
def balanced():
    return _digits()


@pytest.mark.parametrize("profile", ["step", "exponential"])
@pytest.mark.parametrize("ratio", [1, 10, 100])
def test_digits_long_tailed(balanced, profile, ratio):
    n_max = int(torch.bincount(balanced["y_train"]).min())  # the smallest class's count
    ds = _digits(imbalance={"profile": profile, "ratio": ratio})
    expected = imbalance_counts(n_max, 10, profile, ratio)
    assert torch.bincount(ds["y_train"], minlength=10).tolist() == expected
    assert ds["class_counts"].tolist() == expected and ds["class_counts"].dtype == torch.int64
    data.validate(ds)
    # the test split is untouched: balanced, and the very same images
    assert torch.equal(ds["x_test"], balanced["x_test"]) and torch.equal(ds["y_test"], balanced["y_test"])
    # every kept training image is one of the balanced training split's, with its label
    full = {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(balanced["x_train"], balanced["y_train"])}
    assert all((bytes(x.numpy().tobytes()), int(y)) in full for x, y in zip(ds["x_train"], ds["y_train"]))
    # the normalisation is the subsample's
    x = ds["x_train"].double() / 16
    assert ds["mean"][0] == pytest.approx(float(x.mean()), rel=1e-12)


def test_balanced_datasets_record_their_counts(balanced):
    assert torch.equal(balanced["class_counts"], torch.bincount(balanced["y_train"], minlength=10))


def test_imbalance_is_seeded():
    option = {"imbalance": {"profile": "step", "ratio": 10}}
    a, b = _digits(**option), _digits(**option)
    assert torch.equal(a["x_train"], b["x_train"]) and torch.equal(a["y_train"], b["y_train"])
    other = data.load("digits", seed=1, **option)  # another split seed: another draw (and split)
    assert not torch.equal(a["x_train"], other["x_train"])
    # after train_per_class, n_max is train_per_class
    both = _digits(train_per_class=40, imbalance={"profile": "exponential", "ratio": 4})
    assert both["class_counts"].tolist() == imbalance_counts(40, 10, "exponential", 4)


@pytest.mark.parametrize(
    "imbalance, message",
    [
        ("step", "imbalance must be a mapping"),
        ({"profile": "step"}, "imbalance lacks ratio"),
        ({"profile": "linear", "ratio": 10}, "imbalance.profile 'linear' is unknown; allowed: step, exponential"),
        ({"profile": "step", "ratio": 0.5}, "imbalance.ratio must be a finite number >= 1"),
        ({"profile": "step", "ratio": True}, "imbalance.ratio must be a finite number >= 1"),
        ({"profile": "step", "ratio": math.inf}, "imbalance.ratio must be a finite number >= 1"),
        ({"profile": "step", "ratio": "10"}, "imbalance.ratio must be a finite number >= 1"),
        ({"profile": "step", "ratio": 10, "minority": "first"}, "imbalance has no key minority"),
        ({"profile": "step", "ratio": 1000}, "imbalance ratio 1000 leaves a class without training images"),
    ],
)
def test_bad_imbalance_options(imbalance, message):
    with pytest.raises(ValueError, match=message) as err:
        _digits(imbalance=imbalance)
    assert "\n" not in str(err.value)


def test_validate_checks_class_counts(balanced):
    broken = dict(balanced, class_counts=balanced["class_counts"] + 1)
    with pytest.raises(ValueError, match="class_counts must be the int64"):
        data.validate(broken)
    old = {k: v for k, v in balanced.items() if k != "class_counts"}
    data.validate(old)  # files prepared before class_counts was recorded stay valid
