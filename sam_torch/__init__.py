"""sam_torch: Sharpness-Aware Minimization for PyTorch.

``SAM(params, torch.optim.SGD, lr=0.1, rho=0.05)`` is a ``torch.optim.Optimizer``; the math
is :mod:`sam_core`'s.
"""

from typing import Any

from sam_core import __version__
from sam_torch import _framework  # noqa: F401  (before the rest: without PyTorch, an error naming the extra)
from sam_torch._amp import ScaledSAM
from sam_torch._asam import asam_param_groups
from sam_torch._bn import disable_running_stats, enable_running_stats
from sam_torch._bsam import BSAM, predictive
from sam_torch._distributed import clean_pass
from sam_torch._esam import ESAM
from sam_torch._msharpness import m_sharpness_step
from sam_torch._ops import TorchOps
from sam_torch._options import MomentumSAMOptions, SAMOptions
from sam_torch._rng import RNGReplay
from sam_torch._sam import SAM
from sam_torch._trajectory import MESA, SAF
from sam_torch._variants import (
    AESAM,
    GSAM,
    SAMON,
    WSAM,
    EveryKSAM,
    FriendlySAM,
    LookSAM,
    MomentumSAM,
    ProportionalRhoScheduler,
    RhoWarmup,
    VaSSO,
    normalization_parameters,
)

__all__ = [
    "AESAM",
    "BSAM",
    "ESAM",
    "GSAM",
    "MESA",
    "SAF",
    "SAM",
    "SAMON",
    "WSAM",
    "EveryKSAM",
    "FriendlySAM",
    "LookSAM",
    "MomentumSAM",
    "MomentumSAMOptions",
    "ProportionalRhoScheduler",
    "RNGReplay",
    "RhoWarmup",
    "SAMOptions",
    "ScaledSAM",
    "TorchOps",
    "VaSSO",
    "__version__",
    "asam_param_groups",
    "clean_pass",
    "diagnostics",
    "disable_running_stats",
    "enable_running_stats",
    "m_sharpness_step",
    "normalization_parameters",
    "predictive",
]


def __getattr__(name: str) -> Any:
    # ``sam_torch.diagnostics`` is imported on first use, so ``import sam_torch`` stays light.
    if name == "diagnostics":
        import importlib

        return importlib.import_module("sam_torch.diagnostics")
    raise AttributeError(f"module 'sam_torch' has no attribute {name!r}")
