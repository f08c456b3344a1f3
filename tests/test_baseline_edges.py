"""Baseline edges the USB parity tests do not reach: config messages and bounds, safe inverse."""

import pytest
import torch

from rsmatch.algorithms.freematch import _safe_inverse
from rsmatch.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("freematch.ema_p", -0.5, "freematch.ema_p=-0.5: not in [0, 1]"),
     ("freematch.ema_p", 1.5, "freematch.ema_p=1.5: not in [0, 1]"),
     ("simmatch.temperature", 0, "simmatch.temperature=0.0: must be positive"),
     ("simmatch.da_len", 0, "simmatch.da_len=0: must be >= 1"),
     ("simmatch.smoothing_alpha", -0.5, "simmatch.smoothing_alpha=-0.5: not in [0, 1]"),
     ("simmatch.smoothing_alpha", 1.5, "simmatch.smoothing_alpha=1.5: not in [0, 1]")],
)  # fmt: skip
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"algorithm={key.split('.')[0]}", f"{key}={value}"])
    assert str(err.value) == message


@pytest.mark.parametrize(
    "override",
    ["freematch.ema_p=0", "freematch.ema_p=1", "simmatch.da_len=1",
     "simmatch.smoothing_alpha=0", "simmatch.smoothing_alpha=1"],
)  # fmt: skip
def test_bounds_are_allowed(override):
    load_config(None, [f"algorithm={override.split('.')[0]}", override])


def test_safe_inverse_maps_zero_and_nan_to_zero():
    x = torch.tensor([0.0, -0.0, float("nan"), 2.0, -4.0])
    assert _safe_inverse(x).tolist() == [0.0, 0.0, 0.0, 0.5, -0.25]
