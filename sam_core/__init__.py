"""sam_core: the Sharpness-Aware Minimization math, written once for every backend.

Backends (``sam_torch``, ``sam_jax``) adapt these functions through an
:class:`ArrayListOps` adapter; :class:`NumpyOps` is the float64 reference.
"""

from sam_core._math import (
    apply_perturbation,
    direction_and_sq_norm,
    global_norm,
    perturbation,
    perturbation_scale,
    perturbed_params,
)
from sam_core._ops import ArrayListOps, NumpyOps
from sam_core._validation import (
    check_bool,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_unit_interval,
    validate_sam,
)
from sam_core._version import __version__

__all__ = [
    "ArrayListOps",
    "NumpyOps",
    "__version__",
    "apply_perturbation",
    "check_bool",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
    "check_unit_interval",
    "direction_and_sq_norm",
    "global_norm",
    "perturbation",
    "perturbation_scale",
    "perturbed_params",
    "validate_sam",
]
