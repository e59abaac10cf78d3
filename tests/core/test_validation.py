"""Hyperparameter validation: one message per mistake, whatever the backend."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import sam_core

GOOD = dict(rho=0.05, eps=1e-12, eta=0.01, adaptive=False)

BAD_VALUES = [
    ("rho", -0.1, "rho must be a finite number >= 0, got -0.1"),
    ("rho", math.inf, "rho must be a finite number >= 0, got inf"),
    ("rho", math.nan, "rho must be a finite number >= 0, got nan"),
    ("eps", 0.0, "eps must be a finite number > 0, got 0.0"),
    ("eps", -1e-8, "eps must be a finite number > 0, got -1e-08"),
    ("eta", -0.01, "eta must be a finite number >= 0, got -0.01"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_bad_values_raise_value_error_naming_argument_and_value(name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sam_core.validate_sam(**{**GOOD, name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("rho", "0.05"), ("rho", None), ("rho", True), ("eps", 1j), ("adaptive", 1), ("adaptive", "yes")],
)
def test_wrong_types_raise_type_error(name, value):
    with pytest.raises(TypeError, match=name):
        sam_core.validate_sam(**{**GOOD, name: value})


def test_good_values_pass_including_numpy_scalars():
    sam_core.validate_sam(**GOOD)
    sam_core.validate_sam(rho=np.float32(0.1), eps=np.float64(1e-8), eta=0, adaptive=True)
    sam_core.validate_sam(rho=0, eps=1e-12, eta=0.0, adaptive=False)


def test_array_must_be_scalar():
    with pytest.raises(ValueError, match=r"rho must be a scalar, got an array of shape \(2,\)"):
        sam_core.validate_sam(**{**GOOD, "rho": np.array([0.1, 0.2])})


def test_helpers():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        sam_core.check_unit_interval("alpha", 1.5)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\), got 1.0"):
        sam_core.check_unit_interval("lam", 1.0, closed_right=False)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        sam_core.check_positive_int("k", 0)
    with pytest.raises(TypeError, match=re.escape("k must be an int >= 1, got float 2.0")):
        sam_core.check_positive_int("k", 2.0)
    sam_core.check_unit_interval("alpha", 0.2)
    sam_core.check_positive_int("k", 5)


def test_validate_sam_names_the_epsilon_as_the_caller_does():
    # sam_torch passes SAM's epsilon as sam_eps (eps belongs to its base optimizer); sam_jax
    # keeps optax.contrib.sam's name, eps.
    with pytest.raises(ValueError, match=r"^sam_eps must be a finite number > 0, got 0\.0$"):
        sam_core.validate_sam(**{**GOOD, "eps": 0.0}, eps_name="sam_eps")
    with pytest.raises(ValueError, match=r"^eps must be a finite number > 0, got 0\.0$"):
        sam_core.validate_sam(**{**GOOD, "eps": 0.0})
