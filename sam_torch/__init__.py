"""sam_torch: Sharpness-Aware Minimization for PyTorch.

``SAM(params, torch.optim.SGD, lr=0.1, rho=0.05)`` is a ``torch.optim.Optimizer``; the math
is :mod:`sam_core`'s.
"""

from sam_core import __version__
from sam_torch import _framework  # noqa: F401  (before the rest: without PyTorch, an error naming the extra)
from sam_torch._amp import ScaledSAM
from sam_torch._bn import disable_running_stats, enable_running_stats
from sam_torch._distributed import clean_pass
from sam_torch._msharpness import m_sharpness_step
from sam_torch._ops import TorchOps
from sam_torch._sam import SAM
from sam_torch._variants import (
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
    "GSAM",
    "SAM",
    "SAMON",
    "WSAM",
    "EveryKSAM",
    "FriendlySAM",
    "LookSAM",
    "MomentumSAM",
    "ProportionalRhoScheduler",
    "RhoWarmup",
    "ScaledSAM",
    "TorchOps",
    "VaSSO",
    "__version__",
    "clean_pass",
    "disable_running_stats",
    "enable_running_stats",
    "m_sharpness_step",
    "normalization_parameters",
]
