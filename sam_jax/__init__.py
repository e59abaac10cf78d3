"""sam_jax: Sharpness-Aware Minimization as Optax gradient transformations."""

from sam_core import __version__

__all__ = ["__version__"]
