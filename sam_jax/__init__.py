"""sam_jax: Sharpness-Aware Minimization as Optax gradient transformations.

``optax.chain(sam_jax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))``; the math is
:mod:`sam_core`'s, adapted by :class:`JaxOps`.
"""

from typing import Any

from sam_core import __version__
from sam_jax import _framework  # noqa: F401  (before the rest: without JAX and Optax, an error naming the extra)
from sam_jax._asam import asam_mask
from sam_jax._bsam import BSAMState, bsam, bsam_noise, predictive
from sam_jax._chain import check_chain
from sam_jax._esam import ESAMState, esam, esam_masks
from sam_jax._grad_fn import FullParamsGradFn, with_full_params
from sam_jax._msharpness import chunk_batch, m_sharpness_update
from sam_jax._ops import JaxOps
from sam_jax._sam import SAMState, sam
from sam_jax._trajectory import (
    MESAState,
    SAFState,
    mesa,
    mesa_trajectory_loss,
    saf,
    saf_trajectory_loss,
)
from sam_jax._variants import (
    AESAMState,
    EveryKSAMState,
    FriendlySAMState,
    GSAMState,
    LookSAMState,
    MomentumSAMState,
    SAMONState,
    VaSSOState,
    WSAMState,
    ae_sam,
    every_k_sam,
    friendly_sam,
    gsam,
    looksam,
    momentum_sam,
    normalization_mask,
    proportional_rho_schedule,
    rho_warmup_schedule,
    samon,
    vasso,
    wsam,
)

__all__ = [
    "AESAMState",
    "BSAMState",
    "ESAMState",
    "EveryKSAMState",
    "FriendlySAMState",
    "FullParamsGradFn",
    "GSAMState",
    "JaxOps",
    "LookSAMState",
    "MESAState",
    "MomentumSAMState",
    "SAFState",
    "SAMONState",
    "SAMState",
    "VaSSOState",
    "WSAMState",
    "__version__",
    "ae_sam",
    "asam_mask",
    "bsam",
    "bsam_noise",
    "check_chain",
    "chunk_batch",
    "diagnostics",
    "esam",
    "esam_masks",
    "every_k_sam",
    "friendly_sam",
    "gsam",
    "looksam",
    "m_sharpness_update",
    "mesa",
    "mesa_trajectory_loss",
    "momentum_sam",
    "normalization_mask",
    "predictive",
    "proportional_rho_schedule",
    "rho_warmup_schedule",
    "saf",
    "saf_trajectory_loss",
    "sam",
    "samon",
    "vasso",
    "with_full_params",
    "wsam",
]


def __getattr__(name: str) -> Any:
    # ``sam_jax.diagnostics`` is imported on first use, so ``import sam_jax`` stays light.
    if name == "diagnostics":
        import importlib

        return importlib.import_module("sam_jax.diagnostics")
    raise AttributeError(f"module 'sam_jax' has no attribute {name!r}")
